# The two commands from the README. Both create .venv on first use and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := output/demo

.PHONY: venv test demo floors fmnist-data

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Two pytest workers (pytest-xdist), one a core: most tests run one torch thread.
test: venv
	$(PY) -m pytest -q -n 2 tests

# Train BViT-5M on the bundled DIGITS set (on the CPU; README gives the time), then evaluate the saved
# checkpoint on the 357 held-out images: the last line is its top-1 accuracy.
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) train_hp.py --config configs/demo_digits.yaml --output_dir $(DEMO_DIR)
	$(PY) train_hp.py --config configs/demo_digits.yaml --eval --resume $(DEMO_DIR)/checkpoint.pth

# The whole suite in a fresh venv (/tmp/bvit-floors, or FLOORS_VENV=...) at the declared floors of
# torch, torchvision and timm (CPU wheels only): see scripts/test_floors.sh and docs/installing.md.
floors:
	PYTHON=$(PYTHON) scripts/test_floors.sh

# The four Fashion-MNIST files (Debian's dataset-fashion-mnist, or FMNIST_SRC=...) copied into
# data/fashion-mnist/ (git-ignored, 30 MB), the folder a GPU run carries for studies/fmnist_gpu.py
# (scripts/gpu_check.sh --only fmnist).
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
fmnist-data:
	mkdir -p data/fashion-mnist
	cp $(FMNIST_SRC)/train-images-idx3-ubyte.gz $(FMNIST_SRC)/train-labels-idx1-ubyte.gz \
	   $(FMNIST_SRC)/t10k-images-idx3-ubyte.gz $(FMNIST_SRC)/t10k-labels-idx1-ubyte.gz data/fashion-mnist/
