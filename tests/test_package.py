"""bvit is a self-contained, installable package: built from pyproject.toml, every module under
bvit/ imports from another folder with only the installed copy on the path (its optional
dependencies, matplotlib, scikit-learn, onnx, onnxruntime, only where used), and nothing in it
imports the training scripts at the repository root (which import bvit: no loop)."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'bvit'
ROOT_MODULES = sorted(p.stem for p in REPO.glob('*.py'))  # train_hp, utils, datasets, engine, ...
MODULES = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')


def _imports(path: Path):
    """(line, top-level module name) of every import in a file, relative imports excluded."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split('.')[0]


def test_root_scripts_are_known():
    assert {'train_hp', 'utils', 'datasets', 'engine'} <= set(ROOT_MODULES)


@pytest.mark.parametrize('module', MODULES)
def test_no_bvit_module_imports_a_root_script_or_edits_sys_path(module):
    path = PACKAGE / f'{module}.py'
    bad = [f'line {line}: import {name}' for line, name in _imports(path) if name in ROOT_MODULES]
    assert bad == [], f'bvit/{module}.py imports the training scripts: {bad}'
    assert not re.search(r'sys\.path\.(insert|append)|sys\.path\s*=', path.read_text()), module


def test_no_module_shadows_the_standard_library():
    names = getattr(sys, 'stdlib_module_names', None)
    if names is None:  # Python < 3.10
        pytest.skip('sys.stdlib_module_names needs Python 3.10')
    assert sorted(set(MODULES) & set(names)) == []


def test_pyproject_floors_are_requirements_txt_floors():
    tomllib = pytest.importorskip('tomllib')
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    floors = dict(re.match(r'([\w-]+)>=([\d.]+)$', d).groups() for d in project['dependencies'] if '>=' in d)
    reqs = dict(re.match(r'([\w-]+)>=([\d.]+)$', line.strip()).groups()
                for line in (REPO / 'requirements.txt').read_text().splitlines()
                if '>=' in line and not line.lstrip().startswith('#'))
    assert floors == {k: v for k, v in reqs.items() if k in floors}
    assert set(floors) == {'torch', 'torchvision', 'timm'}
    pyproject_version = re.search(r"__version__ = '([^']+)'", (PACKAGE / '__init__.py').read_text()).group(1)
    assert project['dynamic'] == ['version'] and pyproject_version


def test_installed_copy_imports_from_another_folder(tmp_path):
    """``pip install --target`` of a copy of the package sources (no dependencies: they are this
    interpreter's), then every bvit module imported in a fresh process whose working folder is
    elsewhere and whose path holds the installed copy and no repository."""
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / 'bvit', ignore=shutil.ignore_patterns('__pycache__'))
    target = tmp_path / 'site'
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index',
                        '--quiet', '--target', str(target), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = sorted(p.stem for p in (target / 'bvit').glob('*.py') if p.stem != '__init__')
    assert installed == MODULES

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    code = (
        'import importlib, json, sys\n'
        'import timm, torch, torchvision\n'
        'before = set(sys.modules)  # what the dependencies import by themselves (torch 2.3 imports onnx when present)\n'
        f'names = {MODULES!r}\n'
        'mods = {n: importlib.import_module("bvit." + n) for n in names}\n'
        'model = timm.create_model("bvit_5m", img_size=32, patch_size=4, depth=1, num_classes=3)\n'
        'out = model(torch.zeros(1, 3, 32, 32))\n'
        'roots = sorted(m for m in ' + repr(ROOT_MODULES) + ' if m in sys.modules)\n'
        'extras = sorted(m for m in ("matplotlib", "sklearn", "onnx", "onnxruntime") if m in set(sys.modules) - before)\n'
        'print(json.dumps({"files": {n: m.__file__ for n, m in mods.items()}, "shape": list(out.shape), '
        '"roots": roots, "extras": extras}))\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS='1', PYTHONNOUSERSITE='1')
    r = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['shape'] == [1, 3]
    assert got['roots'] == []  # no training script was imported along the way
    assert got['extras'] == []  # optional dependencies are imported where used: plain `pip install .` suffices
    for name, file in got['files'].items():
        assert Path(file).resolve().parent == (target / 'bvit').resolve(), (name, file)
