"""Docs that cannot rot: what README.md and docs/*.md show must still be true of the code.

Three checks, each parametrized by markdown file (the checkers are in doc_checks.py):

* **Python blocks run.** Every ``python`` (or ``py``) block of README.md and docs/ runs, in page
  order, in one namespace and one fresh interpreter per page, from the repository root.
  ``python skip`` blocks are not run: each is its own test case that reports itself skipped
  (``pytest -rs`` lists them with their file:line).
* **Shell commands name what exists.** A repository script a command runs must exist and accept
  every flag written after it (as its own ``--help`` lists them); a ``make`` target must be
  defined in the Makefile; a path under one of the repository's folders must exist.
* **Links resolve.** In these pages, CHANGELOG.md and figs/*.md, every relative link or image must
  point at an existing file or folder, and a ``#anchor`` at a heading of the target page, slugged
  as GitHub slugs headings.

The checkers themselves are tested on small pages in ``tmp_path`` (the end of this file), so a
checker that silently finds nothing fails too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from doc_checks import (DOC_FILES, LINK_FILES, REPO, SHELL_LANGS, Block, Help, Script, command_lines,
                        fenced_blocks, flags_after, github_slug, heading_anchors, is_python, is_skipped,
                        link_problems, link_targets, read, rel, run_python_blocks, script_help,
                        shell_problems, shell_tokens, simple_commands)


# --------------------------------------------------------------------------------------------
# 1. Python blocks
# --------------------------------------------------------------------------------------------

def skip_cases() -> list:
    """One pytest case per ``python skip`` block of the pages, named ``file:line``."""
    cases = []
    for page in DOC_FILES:
        for b in fenced_blocks(read(page)):
            if is_skipped(b):
                where = f'{rel(page)}:{b.line}'
                cases.append(pytest.param(where, id=where))
    return cases


@pytest.mark.parametrize('page', DOC_FILES, ids=[rel(p) for p in DOC_FILES])
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    """The page's python examples run as written, top to bottom, against the current code."""
    n, failure = run_python_blocks(page, tmp_path)
    if n == 0:
        pytest.skip(f'{rel(page)}: no runnable python block')
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize('where', skip_cases())
def test_python_skip_block(where: str) -> None:
    """A ``python skip`` block is shown, not run; reported so that nobody forgets it exists."""
    pytest.skip(f'{where}: marked python skip')


# --------------------------------------------------------------------------------------------
# 2. Shell commands
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('page', DOC_FILES, ids=[rel(p) for p in DOC_FILES])
def test_shell_commands(page: Path) -> None:
    """The page's commands run scripts that exist with flags they accept, make targets that are
    defined, and name files that exist."""
    problems = shell_problems(page)
    if problems:
        pytest.fail(f'{len(problems)} problem(s) in the commands of {rel(page)}:\n' + '\n'.join(problems),
                    pytrace=False)


# --------------------------------------------------------------------------------------------
# 3. Links
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('page', LINK_FILES, ids=[rel(p) for p in LINK_FILES])
def test_links(page: Path) -> None:
    """Every relative link and image of the page points at a file or folder that exists, and every
    anchor at a heading that exists."""
    problems = link_problems(page)
    if problems:
        pytest.fail(f'{len(problems)} broken link(s) in {rel(page)}:\n' + '\n'.join(problems), pytrace=False)


@pytest.mark.parametrize('page', LINK_FILES, ids=[rel(p) for p in LINK_FILES])
def test_fences_closed(page: Path) -> None:
    """Every fenced block is closed: an unclosed fence swallows the rest of the page, whose
    headings, links and blocks then silently escape every other check."""
    open_ = [f'{rel(page)}:{b.line}: fence {b.info!r} is never closed'
             for b in fenced_blocks(read(page)) if not b.closed]
    if open_:
        pytest.fail('\n'.join(open_), pytrace=False)


# --------------------------------------------------------------------------------------------
# 4. The checkers, on small pages
# --------------------------------------------------------------------------------------------

def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding='utf-8')
    return path


FENCE = '```'


def test_github_slug() -> None:
    assert github_slug('Speed of the broad attention') == 'speed-of-the-broad-attention'
    assert (github_slug('Where this differs from the paper and from the release')
            == 'where-this-differs-from-the-paper-and-from-the-release')
    assert github_slug('`add_broad_attention`: other backbones') == 'add_broad_attention-other-backbones'
    assert github_slug('T2T-ViT, the paper\'s second backbone') == 't2t-vit-the-papers-second-backbone'
    assert github_slug('Cost: parameters, FLOPs, speed, memory') == 'cost-parameters-flops-speed-memory'
    # letters of any script kept, '&' removed, each space a hyphen
    assert github_slug('Größe & Ähnlichkeit') == 'größe--ähnlichkeit'
    assert github_slug('See [the docs](docs/x.md) *now*') == 'see-the-docs-now'


def test_heading_anchors_of_a_page() -> None:
    text = '\n'.join([
        '# BViT', '### Speed of the broad attention',
        '## Where this differs from the paper and from the release',
        '### `add_broad_attention`: other backbones',
        FENCE + 'bash', '# not a heading', FENCE,
        'Results', '=======', '## Results', '## Results ##',
    ])
    assert heading_anchors(text) == [
        'bvit', 'speed-of-the-broad-attention', 'where-this-differs-from-the-paper-and-from-the-release',
        'add_broad_attention-other-backbones', 'results', 'results-1', 'results-2']


def test_fenced_blocks_nested_indented_and_tilde() -> None:
    text = '\n'.join([
        '````markdown',         # 1: a 4-backtick fence showing a page with a block in it
        FENCE + 'bash',         # 2: content, not a block
        'python train_hp.py --no-such-flag',
        FENCE,                  # 4: too short to close the 4-backtick fence
        '````',                 # 5
        '~~~python',            # 6: a tilde fence
        'x = 1',
        FENCE,                  # 8: backticks do not close a tilde fence
        '~~~',                  # 9
        '- a list item:',
        '',
        '  ' + FENCE + 'py',    # 12: an indented fence (list item)
        '    y = 2',
        '  ' + FENCE,
    ])
    blocks = fenced_blocks(text)
    assert [(b.line, b.lang, b.closed) for b in blocks] == [(1, 'markdown', True), (6, 'python', True),
                                                            (12, 'py', True)]
    assert blocks[0].source == '```bash\npython train_hp.py --no-such-flag\n```'
    assert blocks[1].source == 'x = 1\n```'
    assert blocks[2].source == '  y = 2'  # the fence's indentation taken off, the rest kept
    assert fenced_blocks('```python\nx = 1\n') == [Block(line=1, first=2, info='python', source='x = 1\n',
                                                          closed=False)]


def test_python_blocks_run_in_order_in_one_namespace_and_a_failure_names_its_block(tmp_path: Path) -> None:
    """Blocks share one namespace in page order; python skip and text blocks do not run; the
    failure names the block's file:line, the traceback its own line, and later blocks do not run."""
    page = write(tmp_path, 'page.md', '\n'.join([
        '# Page', FENCE + 'python', 'x = 20', FENCE,                              # 2
        FENCE + 'python skip', 'raise SystemExit("a skip block ran")', FENCE,    # 5
        FENCE + 'text', 'raise RuntimeError("not python")', FENCE,               # 8
        FENCE + 'py', 'y = x + 1', FENCE,                                        # 11
        FENCE + 'python', 'import sys', 'print("before the failure")',           # 14
        'assert y == 21', 'raise ValueError(f"boom {y}")', FENCE,
        FENCE + 'python', 'raise RuntimeError("after the failure")', FENCE,      # 20
    ]))
    python_blocks = [b for b in fenced_blocks(read(page)) if is_python(b)]
    assert [is_skipped(b) for b in python_blocks] == [False, True, False, False, False]
    n, failure = run_python_blocks(page, tmp_path / 'work', root=tmp_path)
    assert n == 4
    assert failure is not None
    assert failure.startswith('page.md:14: python block failed (block 3 of 4')
    assert 'ValueError: boom 21' in failure               # shared namespace: x, then y, seen by block 3
    assert 'File "page.md:14", line 18' in failure         # the page's own line number
    assert 'raise ValueError(f"boom {y}")' in failure      # the source line shown in the traceback
    assert 'before the failure' in failure                 # the output's tail
    assert 'run_blocks.py' not in failure                  # the runner's own frame left out
    assert 'a skip block ran' not in failure and 'after the failure' not in failure


def test_python_blocks_passing_page_and_page_without_blocks(tmp_path: Path) -> None:
    ok = write(tmp_path, 'ok.md',
               f'{FENCE}python\nimport os\nassert os.getcwd() == {str(tmp_path)!r}\n{FENCE}\n')
    assert run_python_blocks(ok, tmp_path / 'w1', root=tmp_path) == (1, None)
    empty = write(tmp_path, 'empty.md',
                  f'# Nothing to run\n{FENCE}python skip\nraise SystemExit(1)\n{FENCE}\n')
    assert run_python_blocks(empty, tmp_path / 'w2', root=tmp_path) == (0, None)


def test_a_crashing_block_is_named(tmp_path: Path) -> None:
    page = write(tmp_path, 'p.md',
                 f'{FENCE}python\nx = 1\n{FENCE}\n\n{FENCE}python\nimport os\nos._exit(7)\n{FENCE}\n')
    n, failure = run_python_blocks(page, tmp_path / 'work', root=tmp_path)
    assert n == 2 and failure is not None
    assert failure == 'p.md:5: python block ended the interpreter with exit status 7'


def test_command_lines_and_tokens() -> None:
    block = Block(line=1, first=2, info='bash', source='\n'.join([
        '#SBATCH --nodes=2',
        'OUT=/path/to/save',
        'python a.py --x 1 \\',
        '    --y=2   # a comment with --z',
        "echo 'a # b' c#d # gone",
        'cat <<EOF',
        'python not_a_command.py --nope',
        'EOF',
        '$ make demo',
    ]), closed=True)
    assert command_lines(block) == [(3, 'OUT=/path/to/save'), (4, 'python a.py --x 1      --y=2'),
                                    (6, "echo 'a # b' c#d"), (7, 'cat <<EOF'), (10, 'make demo')]
    console = Block(line=1, first=2, info='console',
                    source='$ python a.py \\\n> --x\noutput --y\n$ echo $?\n3', closed=True)
    assert command_lines(console) == [(2, 'python a.py  --x'), (5, 'echo $?')]
    tokens = shell_tokens('A=1 srun python t.py --x 2>&1 | tee log; R=(--resume "$O") && make demo')
    assert simple_commands(tokens) == [['A=1', 'srun', 'python', 't.py', '--x'], ['tee', 'log'], ['R='],
                                       ['--resume', '$O'], ['make', 'demo']]
    words = ['CKPT', 'OUT', '[--force]', '[--use-ema]', '--x=--y', '-', '-1', '...', '--', '--z']
    assert flags_after(words) == ['--force', '--use-ema', '--x']


def fake_help(options: set[str]) -> Callable[[Script, Path], Help]:
    """A stand-in for script_help: every script accepts exactly ``options``."""
    def help_for(script: Script, root: Path) -> Help:
        return Help(frozenset(options))
    return help_for


def test_shell_problems_launchers_make_and_paths(tmp_path: Path) -> None:
    """Launchers before the script are passed over, only flags after it count; make targets and
    named paths are checked (with a stand-in for --help, so this runs no script)."""
    write(tmp_path, 'train.py', 'import argparse\n')
    write(tmp_path, 'bvit/export.py', 'import argparse\n')
    write(tmp_path, 'scripts/job.sbatch', '#!/bin/bash\n')
    write(tmp_path, 'configs/a.yaml', 'x: 1\n')
    write(tmp_path, 'Makefile', '.PHONY: demo\nPY := python\ndemo: venv\n\tpython train.py\nvenv:\n')
    page = write(tmp_path, 'README.md', '\n'.join([
        FENCE + 'bash',
        'torchrun --nproc_per_node=4 train.py --config configs/a.yaml --good',                # 2: fine
        'python -m torch.distributed.launch --nproc_per_node=4 --use_env train.py --good',    # 3: fine
        'srun --kill-on-bad-exit=1 python train.py --bad --config=configs/missing.yaml',      # 4: 2 problems
        'PYTHON=.venv/bin/python python -m bvit.export CKPT OUT [--good] [--worse]',          # 5: --worse
        'sbatch scripts/job.sbatch',                                                          # 6: fine
        'make demo venv nothing',                                                             # 7: nothing
        'python -m pytest -q tests/test_x.py -k foo',                                         # 8: the file
        'python -m bvit.absent --x; python gone.py',                                          # 9: 2 problems
        FENCE,
        '$ python train.py --bad',                                                            # 11: text, no $
        FENCE + 'text',
        '$ python train.py --bad2 | head -1',                                                 # 13
        'python train.py --output-is-not-a-command',
        FENCE,
    ]))
    help_for = fake_help({'--config', '--good', '-h', '--help'})
    assert shell_problems(page, root=tmp_path, help_for=help_for) == [
        'README.md:4: configs/missing.yaml: no such file or folder in the repository',
        'README.md:4: train.py: unknown flag --bad (not in its --help)',
        'README.md:5: python -m bvit.export: unknown flag --worse (not in its --help)',
        'README.md:7: make nothing: no such target in the Makefile',
        'README.md:8: tests/test_x.py: no such file or folder in the repository',
        'README.md:9: python -m bvit.absent: no bvit/absent.py in the repository',
        'README.md:9: gone.py: no such script in the repository',
        'README.md:13: train.py: unknown flag --bad2 (not in its --help)',
    ]


def test_a_bad_flag_of_the_real_train_hp_is_reported(tmp_path: Path) -> None:
    """Against the real train_hp.py --help (cached: the README's check uses the same run)."""
    page = write(tmp_path, 'page.md', f'{FENCE}bash\npython train_hp.py --config configs/demo_digits.yaml '
                                      f'--no-such-flag --epochs 1\n{FENCE}\n')
    problems = shell_problems(page, root=REPO)
    assert problems == [f'{rel(page)}:2: train_hp.py: unknown flag --no-such-flag (not in its --help)']
    options = script_help(Script('train_hp.py')).options
    assert {'--config', '--epochs', '--output_dir', '--data-path'} <= options


def test_a_script_without_help_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / 'ran'
    write(tmp_path, 'scripts/work.sh', f'#!/bin/bash\ntouch {marker}\n')
    info = script_help(Script('scripts/work.sh'), root=tmp_path)
    assert info.options == frozenset() and 'has no --help' in (info.error or '')
    assert not marker.exists()
    page = write(tmp_path, 'p.md', f'{FENCE}bash\nscripts/work.sh\nscripts/work.sh -x\n{FENCE}\n')
    problems = shell_problems(page, root=tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith('p.md:3: scripts/work.sh -x: scripts/work.sh has no --help')


def test_gpu_check_prints_its_usage() -> None:
    """scripts/gpu_check.sh answers --help with its usage (exit 0), so its flags can be checked."""
    info = script_help(Script('scripts/gpu_check.sh'))
    assert info.error is None
    assert {'--cpu', '--out', '--only'} <= info.options


def test_a_failing_help_is_reported(tmp_path: Path) -> None:
    write(tmp_path, 'broken.py', 'import argparse\nraise SystemExit("cannot start")\n')
    info = script_help(Script('broken.py'), root=tmp_path)
    assert info.error is not None and 'exited with status 1' in info.error and 'cannot start' in info.error


def test_links_files_anchors_and_code(tmp_path: Path) -> None:
    write(tmp_path, 'figs/a.png', '')
    write(tmp_path, 'docs/other.md', '# Other page\n## Speed of the broad attention\n')
    write(tmp_path, 'code.py', 'x = 1\n')
    page = write(tmp_path, 'README.md', '\n'.join([
        '# Title',
        '![fig](figs/a.png) [ok](docs/other.md#speed-of-the-broad-attention) [top](#title)',  # 2: fine
        '[missing](figs/b.png) and ![missing too](docs/none.md)',                           # 3: 2 problems
        '[bad anchor](docs/other.md#speed) [bad here](#nowhere)',                           # 4: 2 problems
        '[web](https://example.org/x) [mail](mailto:a@b.c) [line](code.py#L1-L2) [dir](figs)',  # 5: fine
        '`[in code](nowhere.md)` and [a link over',                                          # 6
        'two lines](#nowhere-else)',                                                        # 7: 1 problem
        FENCE + 'bash', '# Title2', 'echo "[in a block](gone.md)"', FENCE,
        '[![badge](figs/gone.svg)](docs/other.md)',                                         # 12: the image
        '[ref]: docs/absent.md',                                                            # 13
    ]))
    assert link_problems(page, root=tmp_path) == [
        'README.md:3: figs/b.png: figs/b.png does not exist',
        'README.md:3: docs/none.md: docs/none.md does not exist',
        'README.md:4: docs/other.md#speed: no heading of docs/other.md has the anchor #speed '
        '(anchors like it: speed-of-the-broad-attention)',
        'README.md:4: #nowhere: no heading of README.md has the anchor #nowhere',
        'README.md:7: #nowhere-else: no heading of README.md has the anchor #nowhere-else',
        'README.md:12: figs/gone.svg: figs/gone.svg does not exist',
        'README.md:13: docs/absent.md: docs/absent.md does not exist',
    ]
    assert heading_anchors(read(page)) == ['title']  # '# Title2' is in a bash block


def test_the_pages_are_found() -> None:
    """The checks see the README (and the docs folder when there is one), with blocks and links in
    it: a checker that finds nothing would pass everything."""
    assert DOC_FILES[0] == REPO / 'README.md'
    readme = read(REPO / 'README.md')
    assert any(is_python(b) for b in fenced_blocks(readme))
    assert any(b.lang in SHELL_LANGS for b in fenced_blocks(readme))
    assert link_targets(readme) != []
