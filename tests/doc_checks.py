"""The checkers behind tests/test_docs.py: what README.md and docs/*.md show must still be true of
the code. Each reads a markdown page and returns the problems it finds, as ``file:line: problem``.

* **Python blocks run** (``run_python_blocks``). Every fenced block whose info string's first word
  is ``python`` (or ``py``) runs, in page order, in one namespace per page (a page reads top to
  bottom, like a notebook), in one fresh interpreter per page (blocks may monkeypatch modules),
  from the repository root with ``PYTHONPATH`` set to it. ``python skip`` blocks are not run.
* **Shell commands name what exists** (``shell_problems``). In ``bash`` / ``sh`` / ``shell``
  blocks every line, in ``console`` / ``text`` blocks every ``$ `` line, is a command. A
  repository script it runs (``train_hp.py``, ``python -m bvit.export``,
  ``scripts/gpu_check.sh``, also behind launchers: ``torchrun``, ``srun``, ``sbatch``,
  ``VAR=value``) must exist and accept every flag written after it (checked against the option
  strings its own ``--help`` prints, run once per script and session); a ``make`` target must be
  defined in the Makefile; a path under one of the repository's folders (``configs/...``,
  ``tests/fixtures/...``) must exist.
* **Links resolve** (``link_problems``). Every relative link or image must point at an existing
  file or folder, and a ``#anchor`` at a heading of the target page, slugged as GitHub slugs
  headings.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]

# Pages whose python blocks run and whose commands are checked; their links are checked too.
DOC_FILES: list[Path] = [REPO / 'README.md'] + sorted((REPO / 'docs').glob('**/*.md'))
# Pages whose links are checked as well.
LINK_FILES: list[Path] = DOC_FILES + [p for p in [REPO / 'CHANGELOG.md'] if p.exists()] + sorted(
    (REPO / 'figs').glob('*.md'))

PYTHON_LANGS = ('python', 'py')
SHELL_LANGS = ('bash', 'sh', 'shell')  # every line is a command
PROMPT_LANGS = ('console', 'text')     # only "$ " lines are commands
# A relative path whose first part is one of these folders is a file the docs name: it must exist.
TOP_FOLDERS = ('bvit', 'configs', 'docs', 'figs', 'notebooks', 'scripts', 'tests')
# python -m modules that launch a script given after them (its flags are the script's).
LAUNCHER_MODULES = ('torch.distributed.launch', 'torch.distributed.run')
LINK_SCHEMES_NOT_CHECKED = ('http://', 'https://', 'mailto:')
# Tokens holding these are shell expansions or placeholders (<repository url>, $OUT, *.png, {a,b}).
PLACEHOLDER_CHARS = ('$', '*', '<', '>', '{')

SCRIPT_RE = re.compile(r'^(?:\./)?[\w.\-/]*\w\.(?:py|sh|sbatch)$')
ASSIGNMENT_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')
OPTION_RE = re.compile(r'(?<![\w\-])(--?[A-Za-z][\w\-]*)')
# Shell operators that end a simple command, and redirections (whose next token is their target).
REDIRECTIONS = ('>', '>>', '<', '>&', '<&', '&>', '&>>', '>|', '<>', '<<<')


def rel(path: Path, root: Path = REPO) -> str:
    """``path`` relative to ``root`` (as the docs and the test ids name it), else as it is."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Fenced code blocks
# --------------------------------------------------------------------------------------------

FENCE_OPEN_RE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$')


@dataclass(frozen=True)
class Block:
    """One fenced code block: ``line`` is the opening fence's line (1-based), ``first`` the line of
    its first content line, ``words`` its info string split on whitespace."""
    line: int
    first: int
    info: str
    source: str
    closed: bool

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def lang(self) -> str:
        return self.words[0].lower() if self.words else ''


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of a page, in order, as CommonMark reads them: a fence is 3 or more
    backticks or tildes, closed by a line of the same character at least as long, so a ```bash
    inside a ````markdown block is content, not a block. Fences may be indented (list items); the
    content loses the opening fence's indentation. An unclosed fence runs to the end of the page
    (``closed=False``)."""
    lines = text.split('\n')
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_OPEN_RE.match(lines[i])
        if not m or (m['fence'][0] == '`' and '`' in m['info']):
            i += 1
            continue
        indent, fence, info = len(m['indent']), m['fence'], m['info'].strip()
        close_re = re.compile(rf'^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$')
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close_re.match(lines[j]):
            line = lines[j]
            strip = len(line) - len(line.lstrip(' \t'))
            body.append(line[min(indent, strip):])
            j += 1
        blocks.append(Block(line=i + 1, first=i + 2, info=info, source='\n'.join(body),
                            closed=j < len(lines)))
        i = j + 1
    return blocks


def fenced_line_numbers(text: str) -> set[int]:
    """1-based numbers of the lines that are fences or inside fenced blocks (no links or headings
    there: a ``# comment`` in a bash block is not a heading)."""
    inside: set[int] = set()
    n_lines = text.count('\n') + 1
    for b in fenced_blocks(text):
        end = b.first + b.source.count('\n') + (1 if b.closed else 0)
        inside.update(range(b.line, min(end, n_lines) + 1))
    return inside


def is_python(block: Block) -> bool:
    """A python block: the info string's first word is ``python`` or ``py``."""
    return block.lang in PYTHON_LANGS


def is_skipped(block: Block) -> bool:
    """``python skip``: a python block shown, not run (second word ``skip``)."""
    return is_python(block) and len(block.words) > 1 and block.words[1].lower() == 'skip'


def read(path: Path) -> str:
    return path.read_text(encoding='utf-8')


# --------------------------------------------------------------------------------------------
# 1. Python blocks
# --------------------------------------------------------------------------------------------

RUNNER = r'''
"""Runs a page's python blocks in order in one namespace; writes what happened to a JSON file."""
import json, linecache, sys, traceback

blocks_file, progress_file, result_file = sys.argv[1:4]
with open(blocks_file, encoding='utf-8') as f:
    blocks = json.load(f)
namespace = {'__name__': '__main__', '__builtins__': __builtins__}
for index, (file, line, first, source) in enumerate(blocks):
    with open(progress_file, 'w') as f:
        f.write(str(index))
    name = f'{file}:{line}'
    # padded so that traceback line numbers are the page's own; registered so they show the code
    padded = '\n' * (first - 1) + source + '\n'
    linecache.cache[name] = (len(padded), None, padded.splitlines(True), name)
    sys.argv = [name]
    try:
        exec(compile(padded, name, 'exec'), namespace)
    except BaseException as e:
        tb = e.__traceback__.tb_next or e.__traceback__  # drop this runner's frame
        text = ''.join(traceback.format_exception(type(e), e, tb))
        sys.stdout.flush()
        sys.stderr.flush()
        with open(result_file, 'w', encoding='utf-8') as f:
            json.dump({'failed': index, 'traceback': text}, f)
        sys.exit(1)
with open(result_file, 'w', encoding='utf-8') as f:
    json.dump({'ran': len(blocks)}, f)
'''


def tail(text: str, n: int) -> str:
    return '\n'.join(text.rstrip('\n').split('\n')[-n:])


def run_python_blocks(page: Path, work: Path, root: Path = REPO) -> tuple[int, Optional[str]]:
    """Runs the page's runnable python blocks in order, sharing one namespace, in one fresh
    ``sys.executable`` with cwd ``root``, ``PYTHONPATH=root`` and ``MPLBACKEND=Agg``. Returns the
    number of runnable blocks and ``None``, or a failure message that starts with the failing
    block's ``file:line`` (its opening fence) and holds the traceback's tail and the output's tail.
    Tracebacks name the block as ``File "README.md:94", line 101``: the page's own line number."""
    name = rel(page, root)
    blocks = [b for b in fenced_blocks(read(page)) if is_python(b) and not is_skipped(b)]
    if not blocks:
        return 0, None
    work.mkdir(parents=True, exist_ok=True)
    runner, blocks_file = work / 'run_blocks.py', work / 'blocks.json'
    progress, result = work / 'progress.txt', work / 'result.json'
    runner.write_text(RUNNER, encoding='utf-8')
    blocks_file.write_text(json.dumps([(name, b.line, b.first, b.source) for b in blocks]),
                           encoding='utf-8')
    env = dict(os.environ, PYTHONPATH=str(root), MPLBACKEND='Agg')
    proc = subprocess.run([sys.executable, str(runner), str(blocks_file), str(progress), str(result)],
                          cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors='replace')
    output = f'\n--- output tail ---\n{tail(proc.stdout, 20)}' if proc.stdout.strip() else ''
    if proc.returncode == 0 and result.exists() and json.loads(read(result)).get('ran') == len(blocks):
        return len(blocks), None
    if result.exists():
        outcome = json.loads(read(result))
        failed = blocks[outcome['failed']]
        return len(blocks), (
            f'{name}:{failed.line}: python block failed (block {outcome["failed"] + 1} of {len(blocks)} '
            f'on the page; the ones before it ran, the ones after it did not)\n'
            f'{tail(outcome["traceback"], 30)}{output}')
    # the interpreter died inside a block (os._exit, a crash): name the block it was running
    index = int(read(progress)) if progress.exists() else 0
    failed = blocks[index]
    return len(blocks), (f'{name}:{failed.line}: python block ended the interpreter with exit status '
                         f'{proc.returncode}{output}')


# --------------------------------------------------------------------------------------------
# 2. Shell commands
# --------------------------------------------------------------------------------------------

def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word outside quotes (so
    ``a#b`` and ``'#'`` stay, as in bash)."""
    quote: Optional[str] = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == '\\' and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c == '\\':
            i += 1
        elif c in '"\'':
            quote = c
        elif c == '#' and (i == 0 or line[i - 1] in ' \t;&|()'):
            return line[:i]
        i += 1
    return line


def shell_tokens(command: str) -> list[str]:
    """Words and operators of one logical command line (quotes removed, operators such as ``|``,
    ``&&``, ``;``, ``>`` as tokens of their own). Raises ValueError on an unclosed quote."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ''
    return list(lexer)


def is_operator(token: str) -> bool:
    return bool(token) and all(c in '();<>|&' for c in token)


def command_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, command) of every command in a shell-like block, comments stripped and
    ``\\``-continued lines joined. bash/sh/shell: every line (a ``$ `` prompt taken off);
    console/text: the ``$ `` lines (a continuation may start with ``> ``). Lines of a
    here-document are not commands."""
    raw = block.source.split('\n')
    prompt = block.lang in PROMPT_LANGS
    out: list[tuple[int, str]] = []
    i = 0
    heredoc: Optional[str] = None
    while i < len(raw):
        line, number = raw[i], block.first + i
        i += 1
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        if prompt:
            if not line.startswith('$ '):
                continue
            line = line[2:]
        elif line.startswith('$ '):  # a prompt in a bash block: the command is the same
            line = line[2:]
        command = strip_comment(line).rstrip()
        while command.endswith('\\') and i < len(raw):
            nxt = raw[i]
            i += 1
            if prompt and nxt.startswith('> '):
                nxt = nxt[2:]
            command = command[:-1] + ' ' + strip_comment(nxt).rstrip()
        if not command.strip():
            continue
        out.append((number, command))
        m = re.search(r'<<-?\s*([\'"]?)(\w+)\1', command)
        if m:
            heredoc = m[2]
    return out


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """The simple commands of a token list: split on ``;``, ``&&``, ``||``, ``|``, ``&``,
    parentheses; redirections (with their descriptor, ``2>&1``) and their targets left out."""
    commands: list[list[str]] = [[]]
    skip_next = False
    for t in tokens:
        if skip_next:
            skip_next = False
            continue
        if is_operator(t):
            if t in REDIRECTIONS or t.startswith('<<'):
                skip_next = True
                if commands[-1] and commands[-1][-1].isdigit():  # the descriptor of 2>&1
                    commands[-1].pop()
            else:
                commands.append([])
            continue
        commands[-1].append(t)
    return [c for c in commands if c]


def is_placeholder(token: str) -> bool:
    return any(c in token for c in PLACEHOLDER_CHARS) or '...' in token or '…' in token


@dataclass(frozen=True)
class Script:
    """A repository script a command runs: ``path`` (repo-relative) and how to ask it for help."""
    path: str
    module: Optional[str] = None  # for python -m bvit.X

    @property
    def name(self) -> str:
        return f'python -m {self.module}' if self.module else self.path


def module_path(module: str, root: Path) -> Optional[str]:
    """The repo-relative file ``python -m module`` runs, if it exists."""
    base = module.replace('.', '/')
    for candidate in (f'{base}.py', f'{base}/__main__.py'):
        if (root / candidate).is_file():
            return candidate
    return None


def find_script(words: list[str], root: Path) -> tuple[Optional[Script], int, Optional[str]]:
    """The repository script a simple command runs, the index of the first word after it, and a
    problem if it names one that does not exist. Launchers before it (``torchrun ...``,
    ``python -m torch.distributed.launch ...``, ``srun ...``, ``sbatch``) are passed over; after
    ``python -c`` or ``python -m`` of another module (pytest, pip) no script is run."""
    for j, w in enumerate(words):
        if w == '-c':
            return None, 0, None
        if w == '-m' and j + 1 < len(words):
            module = words[j + 1]
            if module.startswith('bvit.') or module == 'bvit':
                path = module_path(module, root)
                if path is None:
                    return None, 0, f'python -m {module}: no {module.replace(".", "/")}.py in the repository'
                return Script(path, module), j + 2, None
            if module in LAUNCHER_MODULES:
                continue
            return None, 0, None
        if j > 0 and words[j - 1] == '-m':
            continue
        if SCRIPT_RE.match(w) and not w.startswith(('/', '$', '~', '..')):
            path = w[2:] if w.startswith('./') else w
            if not (root / path).is_file():
                return None, 0, f'{path}: no such script in the repository'
            return Script(path), j + 1, None
    return None, 0, None


def flags_after(words: list[str]) -> list[str]:
    """The flags among ``words`` (the arguments of a script): tokens starting with ``-``, with
    ``=value`` and the brackets of optional syntax (``[--force]``) taken off; ``-``, negative
    numbers and placeholders are not flags, and nothing after ``--`` is."""
    flags = []
    for w in words:
        if w == '--':
            break
        t = w.lstrip('[').rstrip(']')
        if not t.startswith('-') or t in ('-', '--') or re.match(r'^-[\d.]', t) or is_placeholder(t):
            continue
        flags.append(t.split('=', 1)[0])
    return flags


@dataclass(frozen=True)
class Help:
    """What ``SCRIPT --help`` gave: the option strings in its output, or why there are none."""
    options: frozenset
    error: Optional[str] = None


_HELP_CACHE: dict[tuple[str, str], Help] = {}


def help_command(script: Script) -> list[str]:
    if script.module:
        return [sys.executable, '-m', script.module, '--help']
    if script.path.endswith('.py'):
        return [sys.executable, script.path, '--help']
    return ['bash', script.path, '--help']


def script_help(script: Script, root: Path = REPO) -> Help:
    """The option strings ``script`` accepts: every ``-x`` / ``--long-name`` in the output of its
    ``--help`` (run once per script and session, from ``root``). A script whose source never
    mentions ``--help`` (nor argparse, for Python) is not run, since it may do its work whatever
    it is given (scripts/test_floors.sh passes its arguments to pytest after building a venv)."""
    key = (str(root), script.name)
    if key in _HELP_CACHE:
        return _HELP_CACHE[key]
    source = read(root / script.path)
    if '--help' not in source and not (script.path.endswith('.py') and 'argparse' in source):
        result = Help(frozenset(), f'{script.name} has no --help (its source never mentions one), so '
                                   f'its flags cannot be checked: name it without flags, or give it a --help')
    else:
        cmd = help_command(script)
        env = dict(os.environ, PYTHONPATH=str(root), MPLBACKEND='Agg')
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors='replace', stdin=subprocess.DEVNULL)
        shown = ' '.join(['python' if c == sys.executable else c for c in cmd])
        if proc.returncode != 0:
            result = Help(frozenset(), f'`{shown}` exited with status {proc.returncode}:\n'
                                       f'{tail(proc.stdout, 10)}')
        else:
            result = Help(frozenset(OPTION_RE.findall(proc.stdout)) | {'-h', '--help'})
            if not OPTION_RE.search(proc.stdout):
                result = Help(frozenset(), f'`{shown}` printed no option strings (no usage?)')
    _HELP_CACHE[key] = result
    return result


@lru_cache(maxsize=None)
def make_targets(makefile: Path) -> frozenset:
    """The targets a Makefile defines: the names before ``:`` of its rule lines (``.PHONY`` ones
    included; ``VAR := value`` is not a rule)."""
    targets: set[str] = set()
    for line in read(makefile).split('\n'):
        m = re.match(r'^([^\s:#=\t][^:=#]*?)\s*::?(?!=)', line)
        if m:
            targets.update(m[1].split())
    return frozenset(targets)


def path_problem(token: str, root: Path) -> Optional[str]:
    """A problem if ``token`` is a relative path under one of TOP_FOLDERS that does not exist."""
    t = token.lstrip('[').rstrip(']')
    if t.startswith('-') and '=' in t:
        t = t.split('=', 1)[1]
    if is_placeholder(t) or t.startswith(('/', '~')):
        return None
    t = t[2:] if t.startswith('./') else t
    first, sep, _ = t.partition('/')
    if sep and first in TOP_FOLDERS and not (root / t).exists():
        return f'{t}: no such file or folder in the repository'
    return None


def command_problems(words: list[str], root: Path,
                     help_for: Callable[[Script, Path], Help] = script_help) -> list[str]:
    """Problems of one simple command: missing named paths, an undefined make target, a missing
    script, or flags its ``--help`` does not list."""
    problems: list[str] = []
    i = 0
    while i < len(words) and ASSIGNMENT_RE.match(words[i]):
        i += 1
    words = words[i:]
    if not words:
        return problems
    for w in words:
        p = path_problem(w, root)
        if p:
            problems.append(p)
    if Path(words[0]).name == 'make':
        args = words[1:]
        other_makefile = ('-C', '-f', '--file', '--directory')
        if not any(a.startswith(other_makefile) for a in args):
            makefile = root / 'Makefile'
            targets = make_targets(makefile) if makefile.exists() else frozenset()
            for a in args:
                if not a.startswith('-') and '=' not in a and not is_placeholder(a) and a not in targets:
                    problems.append(f'make {a}: no such target in the Makefile')
        return problems
    script, start, problem = find_script(words, root)
    if problem:
        problems.append(problem)
    if script is None:
        return problems
    flags = flags_after(words[start:])
    if not flags:
        return problems
    info = help_for(script, root)
    if info.error:
        problems.append(f'{script.name} {" ".join(flags)}: {info.error}')
        return problems
    for flag in flags:
        if flag not in info.options:
            problems.append(f'{script.name}: unknown flag {flag} (not in its --help)')
    return problems


def shell_problems(page: Path, root: Path = REPO,
                   help_for: Callable[[Script, Path], Help] = script_help) -> list[str]:
    """Every problem of the page's shell commands, as ``file:line: problem``."""
    name = rel(page, root)
    problems: list[str] = []
    for block in fenced_blocks(read(page)):
        if block.lang not in SHELL_LANGS + PROMPT_LANGS:
            continue
        lines = command_lines(block)
        k = 0
        while k < len(lines):
            number, command = lines[k]
            k += 1
            while True:
                try:
                    tokens = shell_tokens(command)
                    break
                except ValueError as e:  # a quote that closes on a later line
                    if k < len(lines) and block.lang in SHELL_LANGS:
                        command += '\n' + lines[k][1]
                        k += 1
                        continue
                    problems.append(f'{name}:{number}: cannot read the command ({e}): {command}')
                    tokens = []
                    break
            for words in simple_commands(tokens):
                problems += [f'{name}:{number}: {p}' for p in command_problems(words, root, help_for)]
    return problems


# --------------------------------------------------------------------------------------------
# 3. Links
# --------------------------------------------------------------------------------------------

def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading's text: lowercase; every character that is not a letter,
    digit (any script), space, hyphen or underscore removed; each space a hyphen. Markdown in the
    heading counts as its rendered text (backticks, emphasis marks go; a link keeps its text)."""
    text = re.sub(r'!\[[^\]]*\]\([^)]*\)', '', text)       # images: no text
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)   # links: their text
    text = re.sub(r'<[^>\s][^>]*>', '', text)               # HTML tags
    kept = [c for c in text.strip().lower() if c in ' -_' or unicodedata.category(c)[0] in 'LNM']
    return ''.join(kept).replace(' ', '-')


ATX_RE = re.compile(r'^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$')
SETEXT_RE = re.compile(r'^ {0,3}(=+|-+)[ \t]*$')


def headings(text: str) -> list[tuple[int, str]]:
    """(line, text) of the page's ATX (``## x``) and setext (``x`` over ``===``) headings, outside
    fenced blocks."""
    fenced = fenced_line_numbers(text)
    lines = text.split('\n')
    out: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        if n in fenced:
            continue
        m = ATX_RE.match(line)
        if m:
            out.append((n, (m[2] or '').strip()))
            continue
        prev = lines[n - 2] if n >= 2 else ''
        if (SETEXT_RE.match(line) and n - 1 not in fenced and prev.strip()
                and not ATX_RE.match(prev) and not re.match(r'^\s*([-*+>|]|\d+[.)])', prev)):
            out.append((n - 1, prev.strip()))
    return out


def heading_anchors(text: str) -> list[str]:
    """The anchors of the page's headings in order, a repeated slug suffixed -1, -2, ... (as
    github-slugger does)."""
    occurrences: dict[str, int] = {}
    anchors = []
    for _, heading in headings(text):
        base = result = github_slug(heading)
        while result in occurrences:
            occurrences[base] += 1
            result = f'{base}-{occurrences[base]}'
        occurrences[result] = 0
        anchors.append(result)
    return anchors


@lru_cache(maxsize=None)
def page_anchors(path: Path) -> frozenset:
    """Heading anchors plus explicit ``<a name=...>`` / ``id=...`` anchors of a page."""
    text = read(path)
    explicit = re.findall(r'<a\s[^>]*?(?:name|id)\s*=\s*["\']([^"\']+)["\']', text)
    return frozenset(heading_anchors(text)) | frozenset(explicit)


LINK_RE = re.compile(
    r'!?\[(?P<text>(?:[^\[\]\\]|\\.|\[(?:[^\[\]\\]|\\.)*\])*)\]'
    r'\(\s*(?P<target><[^<>\n]*>|(?:[^\s()\\]|\\.|\((?:[^\s()\\]|\\.)*\))*)'
    r'(?:\s+(?:"[^"]*"|\'[^\']*\'|\([^()]*\)))?\s*\)')
REFERENCE_RE = re.compile(r'^ {0,3}\[(?!\^)([^\]]+)\]:[ \t]*(<[^>]*>|\S+)', re.M)
CODE_SPAN_RE = re.compile(r'(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)', re.S)


def _blank(m: re.Match) -> str:
    return re.sub(r'[^\n]', ' ', m[0])


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link and image (also inside another link's text) and every
    reference definition (``[x]: target``) of a page, outside fenced blocks, inline code spans
    and HTML comments."""
    lines = text.split('\n')
    fenced = fenced_line_numbers(text)
    masked = '\n'.join('' if n in fenced else line for n, line in enumerate(lines, 1))
    masked = re.sub(r'<!--.*?-->', _blank, masked, flags=re.S)
    masked = CODE_SPAN_RE.sub(_blank, masked)
    found: list[tuple[int, int, str]] = []  # (line, position, target)

    def scan(s: str, offset: int) -> None:
        for m in LINK_RE.finditer(s):
            position = offset + m.start('target')
            found.append((masked.count('\n', 0, position) + 1, position, m['target']))
            scan(m['text'], offset + m.start('text'))

    scan(masked, 0)
    for m in REFERENCE_RE.finditer(masked):
        found.append((masked.count('\n', 0, m.start(2)) + 1, m.start(2), m[2]))
    return [(line, target) for line, _, target in sorted(found)]


def link_problem(page: Path, target: str, root: Path) -> Optional[str]:
    """A problem if a relative link target does not resolve: its file part (relative to the page's
    folder; ``/x`` from the repository root) must exist, its ``#anchor`` (alone: the page itself)
    must be a heading anchor of the target page (or ``L10`` / ``L10-L20`` of another file)."""
    target = target.strip()
    if target.startswith('<') and target.endswith('>'):
        target = target[1:-1]
    if target.lower().startswith(LINK_SCHEMES_NOT_CHECKED):
        return None
    if not target:
        return 'empty link target'
    if re.match(r'^[A-Za-z][A-Za-z0-9+.\-]*:', target):
        return f'{target}: a link scheme this check does not know (only http, https, mailto)'
    path_part, hash_, anchor = target.partition('#')
    path_part = urllib.parse.unquote(path_part.split('?', 1)[0])
    if not path_part:
        dest = page
    elif path_part.startswith('/'):
        dest = root / path_part.lstrip('/')
    else:
        dest = page.parent / path_part
    if not dest.exists():
        return f'{target}: {rel(dest, root)} does not exist'
    if not hash_ or not anchor:
        return None
    anchor = urllib.parse.unquote(anchor)
    if dest.is_dir():
        return f'{target}: an anchor on a folder'
    if dest.suffix.lower() in ('.md', '.markdown'):
        anchors = page_anchors(dest.resolve())
        if anchor not in anchors:
            close = sorted(a for a in anchors if anchor.split('-')[0] in a)[:3]
            hint = f' (anchors like it: {", ".join(close)})' if close else ''
            return f'{target}: no heading of {rel(dest, root)} has the anchor #{anchor}{hint}'
        return None
    if not re.fullmatch(r'L\d+(-L\d+)?', anchor):
        return f'{target}: #{anchor} on a file that is not markdown (only #L10 / #L10-L20 resolve there)'
    return None


def link_problems(page: Path, root: Path = REPO) -> list[str]:
    """Every broken relative link of a page, as ``file:line: problem``."""
    name = rel(page, root)
    problems = []
    for line, target in link_targets(read(page)):
        p = link_problem(page, target, root)
        if p:
            problems.append(f'{name}:{line}: {p}')
    return problems
