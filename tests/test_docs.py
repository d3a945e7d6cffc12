"""The documentation's commands and paths are real.

Every shell command in a fenced code block of README.md and docs/**/*.md that starts the CLI (``rkd-fast ...``,
``python -m rkd_fast ...``, ``torchrun ... -m rkd_fast ...``; backslash continuations joined, ``#`` comments
dropped) is parsed, not run, by the real parser, ``rkd_fast.cli.build_parser()``, with abbreviations switched
off: a renamed or removed flag, command or choice makes argparse exit, and the case fails naming the file and line
(so a rename fails here, not for a user). ``make TARGET`` lines must name Makefile targets, ``pip install
'rkd_fast[EXTRA]'`` lines extras of pyproject.toml, ``python -m MODULE`` lines an importable module, and every
repository path a command passes (``pytest tests/...``, ``python benchmarks/...``) must exist.

Every relative Markdown link and every repository path in backticks (one word with a ``/`` that ends in ``/`` or
an extension, whose first part is a top-level entry of the repository or of the document's folder; a ``*`` must
match something) or in plain prose (starting with one of the package, test, docs, benchmark, example or kernel
folders) must exist, so a moved or deleted file cannot stay named in the docs.
"""

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from rkd_fast.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REPO_DIRS = ("benchmarks/", "csrc/", "docs/", "examples/", "rkd_fast/", "tests/")  # a command's path argument

FENCE = re.compile(r"^\s*(?:```|~~~)\s*(\S*)")
SHELL_BLOCKS = ("", "sh", "bash", "shell", "console")  # fenced blocks read as commands (not python, diff, ...)
PROGRAMS = ("rkd-fast", "python", "python3", "torchrun", "make", "pip", "apt-get", "pytest", "bash")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATH_LIKE = re.compile(r"^[\w.\-*/]+(/|\.[A-Za-z0-9]+)$")
# A repository path written without backticks in prose.
BARE_PATH = re.compile(r"(?<![\w/.`<-])((?:benchmarks|csrc|docs|examples|rkd_fast|tests)/[\w./*-]*(?:/|\.[A-Za-z0-9]+))(?![\w/<*-])")


def _where(doc, line):
    return f"{doc.relative_to(ROOT)}:{line}"


def _scan(doc):
    """(commands, prose): commands as (line, argv) from the fenced blocks, continuations joined; prose as (line,
    text) of the lines outside them."""
    commands, prose = [], []
    fenced, shell, pending, start = False, False, "", 0
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line)
        if fence:
            fenced, pending = not fenced, ""
            shell = fenced and fence.group(1) in SHELL_BLOCKS
            continue
        if not fenced:
            prose.append((number, line))
            continue
        if not shell:
            continue
        if not pending:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # prose or code in the block, not a command
            continue
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and words[0] in PROGRAMS:  # other lines of a block are output or prose
            commands.append((start, words))
    return commands, prose


def _cli_argv(words):
    """The arguments the rkd-fast parser gets from a command line, or None when it does not start the CLI."""
    if words[0] == "rkd-fast":
        return words[1:]
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "rkd_fast"]:
        return words[3:]
    if words[0] == "torchrun" and "-m" in words:
        at = words.index("-m")
        if words[at + 1:at + 2] == ["rkd_fast"]:
            return words[at + 2:]
    return None


def _strict(parser):
    """The parser and its subcommands' parsers with abbreviations refused: a renamed flag whose old name is a
    prefix of the new one would otherwise still parse."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def _all_commands():
    return [(doc, line, words) for doc in DOCS for line, words in _scan(doc)[0]]


COMMANDS = _all_commands()
CLI_COMMANDS = [(doc, line, argv) for doc, line, words in COMMANDS if (argv := _cli_argv(words)) is not None]


def test_the_docs_show_commands():
    # The scanner finds the README's quick starts and install lines: a broken scanner must not pass by finding
    # nothing.
    readme = [argv for doc, _, argv in CLI_COMMANDS if doc == ROOT / "README.md"]
    assert {argv[0] for argv in readme} >= {"train", "export", "eval", "frontier"}
    assert len(CLI_COMMANDS) >= 20
    assert ["make", "install"] in [words for doc, _, words in OTHER_COMMANDS if doc == ROOT / "README.md"]


@pytest.mark.parametrize("doc, line, argv", CLI_COMMANDS, ids=[_where(d, n) for d, n, _ in CLI_COMMANDS])
def test_cli_command_parses(doc, line, argv, capsys):
    parser = _strict(build_parser())
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{_where(doc, line)}: `rkd-fast {shlex.join(argv)}` does not parse: "
                    f"{capsys.readouterr().err.strip().splitlines()[-1:]}")


def test_a_renamed_flag_fails_to_parse(capsys):
    """What the test above relies on: an unknown flag exits the strict parser, and so does the old name of a flag
    that is a prefix of its new one (which argparse's default abbreviations would still accept)."""
    _strict(build_parser()).parse_args(["train", "--method", "natural", "--epochs", "1", "--out", "runs/a"])
    build_parser().parse_args(["train", "--epoch", "1", "--out", "runs/a"])  # an abbreviation, by default
    for argv in (["train", "--epoch", "1", "--out", "runs/a"], ["train", "--no-such-flag", "--out", "runs/a"],
                 ["eval", "--dataset", "digits", "--n-example", "5"], ["no-such-command"]):
        with pytest.raises(SystemExit):
            _strict(build_parser()).parse_args(argv)


def _makefile_targets():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*):", text, flags=re.M))


def _extras():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def _other_commands():
    return [(doc, line, words) for doc, line, words in COMMANDS if _cli_argv(words) is None]


OTHER_COMMANDS = _other_commands()


@pytest.mark.parametrize("doc, line, words", OTHER_COMMANDS, ids=[_where(d, n) for d, n, _ in OTHER_COMMANDS])
def test_other_command_names_what_exists(doc, line, words):
    where = _where(doc, line)
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        missing = sorted(set(targets) - _makefile_targets())
        assert not missing, f"{where}: make target(s) {missing} not in the Makefile"
    if words[:2] == ["pip", "install"]:
        for word in words[2:]:
            match = re.fullmatch(r"rkd_fast\[([\w,-]+)\]", word)
            if match:
                missing = sorted(set(match.group(1).split(",")) - _extras())
                assert not missing, f"{where}: pip extra(s) {missing} not in pyproject.toml"
    if words[0] in ("python", "python3") and words[1:2] == ["-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
    for word in words[1:]:
        path = word.split("=", 1)[-1].split("::", 1)[0]
        if path.startswith(REPO_DIRS):
            assert (ROOT / path).exists(), f"{where}: {path} does not exist"


def _references(doc):
    """(line, target, kind) of the relative links and backticked repository paths of a document's prose."""
    found = []
    for number, text in _scan(doc)[1]:
        for target in LINK.findall(text):
            if not re.match(r"^[a-z]+:", target) and not target.startswith("#"):
                found.append((number, target.split("#", 1)[0], "link"))
        for span in CODE_SPAN.findall(text):
            if "/" in span and "://" not in span and not span.startswith(("/", "~")) and PATH_LIKE.match(span):
                found.append((number, span, "path"))
        for path in BARE_PATH.findall(CODE_SPAN.sub("", LINK.sub("", text))):
            found.append((number, path.rstrip("."), "path"))
    return found


def _resolve(doc, target, kind):
    """The files a reference names (a glob's matches), or None when it is not a repository path."""
    if kind == "link":
        return [p for p in [(doc.parent / target)] if p.exists()] if "*" not in target else None
    first = target.split("/", 1)[0]
    for base in (ROOT, doc.parent):
        if (base / first).exists() or (base / first).is_symlink():
            return list(base.glob(target)) if "*" in target else [p for p in [base / target] if p.exists()]
    return None


REFERENCES = [(doc, line, target, kind) for doc in DOCS for line, target, kind in _references(doc)]


def test_the_docs_reference_paths():
    assert sum(kind == "link" for *_, kind in REFERENCES) >= 5
    assert sum(kind == "path" for *_, kind in REFERENCES) >= 10


@pytest.mark.parametrize("doc, line, target, kind", REFERENCES,
                         ids=[f"{_where(d, n)}:{t}" for d, n, t, _ in REFERENCES])
def test_referenced_path_exists(doc, line, target, kind):
    found = _resolve(doc, target, kind)
    assert found is None or found, f"{_where(doc, line)}: {kind} {target!r} names nothing in the repository"
