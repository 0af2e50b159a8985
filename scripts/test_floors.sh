#!/usr/bin/env bash
# Run the whole suite at the declared floors of requirements.txt / pyproject.toml.
#
#   scripts/test_floors.sh            # or: make floors
#   FLOORS_VENV=/some/dir PYTHON=python3.9 scripts/test_floors.sh [pytest args...]
#
# Builds a fresh venv (default /tmp/bvit-floors; removed first) with torch, torchvision and timm
# pinned at the floors, the rest of requirements.txt at whatever pip picks, checks with `pip list`
# that the pins held, prints the versions, then runs `python -m pytest -q tests` (extra arguments
# go to pytest) from the repository root. Needs PyPI (about 4 GB of wheels on the first run, less
# from pip's cache after) and about 6 GB of disk for the venv. It stops first unless
# TORCH/TORCHVISION/TIMM (the versions tested) are the floors both requirements.txt and
# pyproject.toml declare.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;  # before anything is built or removed
esac

TORCH=${TORCH:-2.5.0}
TORCHVISION=${TORCHVISION:-0.20.0}
TIMM=${TIMM:-1.0.26}
VENV=${FLOORS_VENV:-/tmp/bvit-floors}
PYTHON=${PYTHON:-python3}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# The versions tested here must be the floors that requirements.txt and pyproject.toml declare
# (torch>=2.5 is torch 2.5.0), so that the two files agree with each other and with this run.
"$PYTHON" - "$TORCH" "$TORCHVISION" "$TIMM" <<'EOF'
import re, sys

def norm(version):
    parts = [int(p) for p in version.split('.')]
    while parts and parts[-1] == 0:
        parts.pop()
    return parts

bad = []
for name, tested in zip(('torch', 'torchvision', 'timm'), sys.argv[1:]):
    for path, pattern in (('requirements.txt', rf'^{name}>=([\d.]+)[ \t]*$'), ('pyproject.toml', rf'"{name}>=([\d.]+)"')):
        m = re.search(pattern, open(path).read(), re.M)
        if not m or norm(m.group(1)) != norm(tested):
            bad.append(f'{path} declares {m.group(0).strip(chr(34)) if m else f"no {name}>= floor"}, this tests {name} {tested}')
if bad:
    sys.exit('floors: ' + '; '.join(bad))
EOF

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)

"${PIP[@]}" --upgrade pip
# torch and torchvision with their own dependencies, as `pip install torch==...` gives a user. On
# Linux x86_64 that includes the nvidia-* CUDA runtime wheels (about 3 GB): PyPI has no CPU-only
# torch build for it, and torch 2.5's wheel does not import without them (libcudart, libcublas,
# ...: tried with --no-deps). They load without a GPU; the suite runs on the CPU.
PINS=$(mktemp)
REST=$(mktemp)
trap 'rm -f "$REST" "$PINS"' EXIT
printf 'torch==%s\ntorchvision==%s\ntimm==%s\n' "$TORCH" "$TORCHVISION" "$TIMM" >"$PINS"
"${PIP[@]}" "torch==$TORCH" "torchvision==$TORCHVISION" -c "$PINS"
"${PIP[@]}" "timm==$TIMM" -c "$PINS"

# The rest of requirements.txt, without the three pinned here (so pip cannot move them), and with
# them as constraints in case something asks for them again.
grep -viE '^[[:space:]]*(torch|torchvision|timm)([[:space:]<>=!~;]|$)' requirements.txt >"$REST"
"${PIP[@]}" -r "$REST" -c "$PINS"

# The pins held?
"$PY" -m pip list --format=freeze >"$REST"
for want in "torch==$TORCH" "torchvision==$TORCHVISION" "timm==$TIMM"; do
    if ! grep -qix "$want" "$REST"; then
        echo "floors: $want did not hold; pip list has: $(grep -iE "^${want%%==*}==" "$REST" || echo nothing)" >&2
        exit 1
    fi
done

echo "== floors venv: $VENV"
"$PY" - <<'EOF'
import platform
import torch, torchvision, timm, numpy, onnx, onnxruntime, huggingface_hub
print(f'python {platform.python_version()}  torch {torch.__version__}  torchvision {torchvision.__version__}  '
      f'timm {timm.__version__}')
print(f'numpy {numpy.__version__}  onnx {onnx.__version__}  onnxruntime {onnxruntime.__version__}  '
      f'huggingface_hub {huggingface_hub.__version__}  cuda available: {torch.cuda.is_available()}')
EOF
rm -f "$REST" "$PINS"
echo "== python -m pytest -q tests $*"
exec "$PY" -m pytest -q tests "$@"
