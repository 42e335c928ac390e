"""Every command in README.md and docs/*.md is checked against the repository, so the docs cannot go stale silently.

Commands come from fenced code blocks (every line of a bash / sh / shell / console block; the lines of an unlabelled
block that start with python, accelerate, make, pip or hf) and from inline code spans that start with ``python``,
``accelerate launch``, ``make`` or ``pip install``. Each one is checked in-process, without running anything:

- ``python path/to/script.py ...`` / ``python -m module ...`` / ``accelerate launch [opts] script.py|-m module ...``:
  the script or module exists in the repository and its arguments parse with that command's own parser (argparse, or
  the trainers' ``parse_cli`` with their config classes, which also checks every key of a ``--config`` YAML file);
  ``accelerate launch``'s own options parse with accelerate's launch parser and a ``--config_file`` exists;
- ``python -c "..."``: the code compiles and every ``from X import Y`` resolves;
- ``make X``: the Makefile has target X; ``pip install`` of the project: setup.py is there and every extra exists.

Anything else must be listed in :data:`NOT_CHECKED` with the reason, or the test fails.
Placeholders as the docs write them are accepted: ``[--flag value]`` (checked as if given), ``a|b|c`` and ``{a,b}``
(each checked), ``--flag ...`` (a placeholder value). A command quoted in part (inline, or with a bare ``...``) may
leave out required arguments, but every flag it names must exist.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^(\$ )?(python3?|accelerate|make|pip|hf|huggingface-cli)\b")

#: Commands that are not checked here, by their first words, with the reason.
NOT_CHECKED = {
    "hf download": "the Hugging Face Hub CLI downloading a published checkpoint: third-party, needs the network",
    "pip install torch": "installs PyTorch itself, not the project (the build is the user's choice)",
    "pip install lpips": "the optional perceptual-loss package on its own (setup.py's extra `lpips` pins it)",
}


def _fenced_commands(path: pathlib.Path):
    """(line number, command) for every command line of the shell blocks of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fence, lang, pending, start = None, "", "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", stripped)
            if m:
                fence, lang = m.group(1), m.group(2).lower()
            continue
        if stripped.startswith(fence):
            fence = None
            continue
        if lang not in SHELL_LANGS and lang != "":
            continue
        if not pending:
            if not stripped or stripped.startswith("#") or (lang == "" and not COMMAND_START.match(stripped)):
                continue
            if lang == "console" and not stripped.startswith("$ "):  # a console block's output lines
                continue
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, re.sub(r"^\$ ", "", pending + stripped)
        pending = ""


def _inline_commands(path: pathlib.Path):
    """(line number, command) for inline code spans that are a command (python, accelerate launch, make, pip)."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^\s*(```+|~~~+).*?^\s*\1", lambda m: "\n" * m.group(0).count("\n"), text)  # drop fences
    for m in re.finditer(r"(?<!`)`((?:python3?|accelerate launch|make|pip install) [^`\n]+)`(?!`)", text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1)


def _commands():
    out = []
    for path in DOCS:
        for inline, found in ((False, _fenced_commands(path)), (True, _inline_commands(path))):
            for number, command in found:
                out.append(pytest.param(command, inline, id=f"{path.relative_to(ROOT)}:{number}"))
    return out


COMMANDS = _commands()


def _split(command: str) -> list[list[str]]:
    """The words of each command of a line (``a; b`` and ``a && b`` are two), comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    commands = [[]]
    for word in lexer:
        if word in (";", "&&"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def _expand(words: list[str]) -> tuple[list[list[str]], bool]:
    """The command's variants (placeholders resolved) and whether the docs elide part of it.

    ``...`` after a flag is a placeholder value; any other ``...`` is dropped and marks the command as elided;
    ``a|b`` and ``{a,b}`` give one variant per choice."""
    elided, kept = False, []
    for w in words:
        if w == "..." and not (kept and kept[-1].startswith("--")):
            elided = True
        elif w:
            kept.append(w)
    variants = [[]]
    for w in kept:
        if re.fullmatch(r"[\w-]+(\|[\w-]+)+", w):
            choices = w.split("|")
        elif re.fullmatch(r"\{[\w-]+(,[\w-]+)+\}", w):
            choices = w[1:-1].split(",")
        else:
            choices = [w]
        variants = [v + [c] for v in variants for c in choices]
    return variants, elided


# ---------------------------------------------------------------------------------------- parsing without running


class _Parsed(Exception):
    """Raised in place of running a command once its arguments have parsed."""


def _relax(parser: argparse.ArgumentParser) -> None:
    """Nothing required (for commands the docs quote in part): only the flags given are checked."""
    for action in parser._actions:
        action.required = False
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                _relax(action.choices[sub])


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """The docs spell every flag in full (argparse would otherwise accept a prefix of a renamed flag)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action.choices, dict):
            for sub in action.choices.values():
                if isinstance(sub, argparse.ArgumentParser):
                    _no_abbreviations(sub)


@contextlib.contextmanager
def _stop_after_parsing(module, partial: bool):
    """While active, the first top-level ``parse_args`` / ``parse_known_args`` (and the module's ``parse_cli``)
    raises :class:`_Parsed` once the arguments have parsed, so ``main(argv)`` does no work past its parser.
    With ``partial``, required arguments may be missing (and of the trainers' settings only unknown keys count)."""
    depth = [0]
    originals = {name: argparse.ArgumentParser.__dict__[name] for name in ("parse_args", "parse_known_args")}

    def stopping(name):
        def parse(self, args=None, namespace=None):
            if depth[0]:
                return originals[name](self, args, namespace)
            if partial:
                _relax(self)
            _no_abbreviations(self)
            depth[0] += 1
            try:
                result = originals[name](self, args, namespace)
            finally:
                depth[0] -= 1
            raise _Parsed(result)
        return parse

    real_parse_cli = getattr(module, "parse_cli", None)

    def parse_cli(*args, **kwargs):
        try:
            result = real_parse_cli(*args, **kwargs)
        except ValueError as e:
            problems = getattr(e, "problems", [str(e)])
            if partial and not [p for p in problems if "unknown setting" in p or "cannot read" in p]:
                raise _Parsed(None) from None
            raise
        raise _Parsed(result)

    try:
        for name in originals:
            setattr(argparse.ArgumentParser, name, stopping(name))
        if real_parse_cli is not None:
            module.parse_cli = parse_cli
        yield
    finally:
        for name, value in originals.items():
            setattr(argparse.ArgumentParser, name, value)
        if real_parse_cli is not None:
            module.parse_cli = real_parse_cli


def _load_script(path: pathlib.Path):
    """Import a script as ``python path/to/script.py`` sees it (its own folder and the repository on sys.path)."""
    name = "_docs_cmd_" + re.sub(r"\W", "_", str(path.relative_to(ROOT)))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with _script_path(path):
                spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


@contextlib.contextmanager
def _script_path(path: pathlib.Path | None):
    added = [str(p) for p in ((path.parent, ROOT) if path else ()) if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            sys.path.remove(p)


def _load_module(name: str):
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"no module {name!r}"
    assert spec.origin and pathlib.Path(spec.origin).resolve().is_relative_to(ROOT), (
        f"{name!r} is not a module of this repository ({spec.origin})")
    if spec.submodule_search_locations is not None:  # a package: `python -m pkg` runs pkg.__main__
        name += ".__main__"
    return importlib.import_module(name)


def _check_parses(target: str, is_module: bool, argv: list[str], capsys, partial: bool = False) -> None:
    if is_module:
        module = _load_module(target)
    else:
        path = ROOT / target
        assert path.is_file(), f"{target} does not exist in the repository"
        module = _load_script(path)
    assert hasattr(module, "main"), f"{target} has no main(argv) to parse the command line with"
    command = f"{target} {' '.join(argv)}"
    with _script_path(None if is_module else path), _stop_after_parsing(module, partial):
        try:
            module.main(list(argv))
        except _Parsed:
            return
        except SystemExit as e:
            raise AssertionError(f"{command}: exit {e.code}\n{capsys.readouterr().err}") from None
        except ValueError as e:  # the trainers' ConfigError: unknown keys, bad values, a missing --config file
            raise AssertionError(f"{command}: {e}") from None
    raise AssertionError(f"{target}: main() returned without parsing its arguments")


def _check_python(args: list[str], capsys, partial: bool = False) -> None:
    if args[0] == "-m":
        _check_parses(args[1], True, args[2:], capsys, partial)
    elif args[0] == "-c":
        tree = ast.parse(args[1])
        compile(tree, "<docs>", "exec")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"`from {node.module} import` names nothing called {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
    else:
        _check_parses(args[0], False, args[1:], capsys, partial)


def _check_accelerate(args: list[str], capsys, partial: bool = False) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert args[0] == "launch", f"only `accelerate launch` is checked, got accelerate {args[0]}"
    try:
        launch = launch_command_parser().parse_args(args[1:])
    except SystemExit as e:
        raise AssertionError(f"accelerate launch options do not parse: {capsys.readouterr().err}") from e
    if launch.config_file:
        assert (ROOT / launch.config_file).is_file(), f"{launch.config_file} does not exist"
    _check_parses(launch.training_script, bool(launch.module), launch.training_script_args, capsys, partial)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", text, re.M)}


def _setup_keyword(name: str):
    """The literal value of one keyword of setup.py's ``setup(...)`` call."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py's setup() has no {name}=")


def _check_pip(args: list[str]) -> None:
    assert args[0] == "install", f"only `pip install` is checked, got pip {args[0]}"
    targets = [a for a in args[1:] if not a.startswith("-")]
    project = re.escape(_setup_keyword("name"))
    for target in targets:
        m = re.fullmatch(rf"(?:\.|{project})(?:\[([\w,-]+)\])?", target)
        assert m, f"pip install {target}: not the project; list it in NOT_CHECKED with a reason"
        missing = set((m.group(1) or "").split(",")) - {""} - set(_setup_keyword("extras_require"))
        assert not missing, f"setup.py has no extras {sorted(missing)}"


@pytest.mark.parametrize("command,inline", COMMANDS)
def test_documented_command(command, inline, capsys):
    unwrapped = re.sub(r"(?<![\w'\"])\[(--[^\]\[]*)\]", r"\1", command)  # [--flag value]: checked as if given
    variants, partial = [], inline
    for words in _split(unwrapped):
        expanded, elided = _expand(words)
        variants += expanded
        partial = partial or elided
    for words in variants:
        if any(" ".join(words).startswith(prefix) for prefix in NOT_CHECKED):
            continue
        if words[0] in ("python", "python3"):
            _check_python(words[1:], capsys, partial)
        elif words[0] == "accelerate":
            _check_accelerate(words[1:], capsys, partial)
        elif words[0] == "make":
            missing = {w for w in words[1:] if "=" not in w} - _makefile_targets()  # (VAR=value: a variable)
            assert not missing, f"the Makefile has no targets {sorted(missing)}"
        elif words[0] == "pip":
            _check_pip(words[1:])
        else:
            raise AssertionError(f"`{' '.join(words[:2])} ...` is neither checked nor listed in NOT_CHECKED")


def test_commands_were_found():
    """The extraction itself works: the README's two commands and a trainer launch are among the checked ones."""
    found = [p.values[0] for p in COMMANDS]
    assert "make quickstart" in " ".join(found) and "make test" in " ".join(found)
    assert any(c.startswith("accelerate launch train_dfm_flux.py") for c in found)
    assert len(found) >= 20


def test_a_stale_command_fails(capsys):
    """The check can fail: an unknown flag or setting, a missing script, extra or Makefile target are caught."""
    with pytest.raises(AssertionError):
        _check_python(["examples/generate_dit.py", "pipe", "--no-such-flag"], capsys)
    with pytest.raises(AssertionError):
        _check_python(["bench/no_such_bench.py", "--out", "x"], capsys)
    with pytest.raises(AssertionError, match="unknown setting"):
        _check_accelerate(["launch", "train_dfm_dit.py", "--no_such_key", "1"], capsys)
    with pytest.raises(AssertionError, match="unrecognized arguments"):  # quoted in part: still no unknown flags
        _check_python(["-m", "dfm_diffusers.convert", "dit", "--no-such-flag", "x"], capsys, partial=True)
    with pytest.raises(AssertionError, match="no extras"):
        _check_pip(["install", "-e", ".[no-such-extra]"])
    _check_pip(["install", "-e", ".[test]"])
    with pytest.raises(AssertionError, match="no targets"):
        test_documented_command("make no-such-target", False, capsys)
