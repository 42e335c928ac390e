"""Every command line's --help names only files that exist in the repository (so help texts cannot go stale)."""

import importlib
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# repository paths as help texts write them: a top-level folder of the repository, then a path with an extension
PATH = re.compile(r"(?<![\w/.-])((?:examples|docs|bench|tests|dfm_diffusers)/[\w./-]*\.(?:ya?ml|py|md|json|txt))")

COMMANDS = [
    ("train_dfm_dit", "main", []),
    ("train_dfm_flux", "main", []),
    ("dfm_diffusers.convert", "main", []),
    ("dfm_diffusers.convert", "main", ["dit"]),
    ("dfm_diffusers.data.__main__", "main", []),
    ("dfm_diffusers.evaluation.__main__", "main", []),
    ("dfm_diffusers.vae.__main__", "main", []),
    ("dfm_diffusers.quickstart", "main", []),
]


@pytest.mark.parametrize("module,function,prefix", COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_help_names_only_existing_files(module, function, prefix, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        main = getattr(importlib.import_module(module), function)
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit) as exit_info:
        main([*prefix, "--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.strip()
    missing = [path for path in PATH.findall(text) if not (ROOT / path.rstrip(".")).exists()]
    assert not missing, f"{module} {' '.join(prefix)} --help names files that do not exist: {missing}"
    assert "DESIGN" not in text, "help texts must not point to design notes outside the repository"
