"""notebooks/quickstart.ipynb: stored clean, and runs headless from top to bottom (nbclient), once on
a checkpoint made by train_hp.py and once without one (the bundled fixture's random weights)."""
import json
import subprocess
import sys
import uuid
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'
SCALE_ZERO_LINE = 'scale 0 gives the same logits exactly: True'


def test_committed_notebook_is_valid_and_has_no_outputs():
    """The stored notebook is valid nbformat 4 and holds no outputs and no execution counts."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code
    for cell in code:
        assert cell.outputs == [], f'cell {cell.get("id")} was stored with outputs'
        assert cell.execution_count is None, f'cell {cell.get("id")} was stored with an execution count'


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec, under a unique name in a temporary JUPYTER_PATH, that runs this interpreter
    (the project's venv), whatever ``python3`` kernel the machine may have installed."""
    name = f'bvit-test-{uuid.uuid4().hex[:8]}'
    spec = tmp_path / 'jupyter' / 'kernels' / name
    spec.mkdir(parents=True)
    (spec / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': f'BViT tests ({sys.executable})',
        'language': 'python',
    }))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel draws inline (matplotlib-inline)
    return name


@pytest.fixture(scope='module')
def demo_checkpoint(tmp_path_factory):
    """A real checkpoint of the demo recipe, one short epoch of train_hp.py (a few seconds)."""
    out = tmp_path_factory.mktemp('demo')
    subprocess.run([sys.executable, 'train_hp.py', '--config', 'configs/demo_digits.yaml', '--epochs', '1',
                    '--train-subset', '256', '--val-subset', '64', '--output_dir', str(out)],
                   cwd=REPO, check=True, capture_output=True, text=True)
    path = out / 'checkpoint.pth'
    assert path.is_file()
    return path


def _execute(kernel_name):
    """Run every cell of the notebook in ``notebooks/``; nbclient raises CellExecutionError, with the
    failing cell's source and traceback, on the first cell that fails. Returns (stdout text, PNGs)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=None, startup_timeout=300,
                                     resources={'metadata': {'path': str(NOTEBOOK.parent)}})
    client.execute()
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            if out.output_type == 'stream' and out.name == 'stdout':
                text.append(out.text)
            elif out.output_type == 'display_data' and 'image/png' in out.data:
                images += 1
    return ''.join(text), images


def test_notebook_runs_on_a_trained_checkpoint(kernel_name, demo_checkpoint, monkeypatch):
    """With BVIT_CHECKPOINT pointing at a train_hp.py checkpoint, every cell runs: the model is
    loaded from it, predictions are printed, the figures are shown inline and the DeiT check at
    scale 0 finds the very same logits."""
    monkeypatch.setenv('BVIT_CHECKPOINT', str(demo_checkpoint))
    text, images = _execute(kernel_name)
    assert f'loaded the trained model from {demo_checkpoint}' in text
    assert 'bvit_5m: 16x16 input, 2x2 patches, 10 classes' in text
    assert 'predicted: [' in text and 'true:      [' in text
    assert images >= 4  # the digits, two attention figures, the broad maps
    assert SCALE_ZERO_LINE in text


def test_notebook_runs_without_a_checkpoint(kernel_name, tmp_path, monkeypatch):
    """Without a checkpoint (a fresh clone before ``make demo``) every cell runs on the fixture's
    random weights in the released layout, and the notebook says so."""
    monkeypatch.setenv('BVIT_CHECKPOINT', str(tmp_path / 'no_such_checkpoint.pth'))
    text, images = _execute(kernel_name)
    assert 'using RANDOM weights' in text and 'Run `make demo` first' in text
    assert 'bvit_5m: 224x224 input, 7x7 patches, 10 classes' in text
    assert images >= 4
    assert SCALE_ZERO_LINE in text
