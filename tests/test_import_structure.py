"""The library's import graph has no circles (module-level or deferred imports alike) and no module is over 550 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dfm_diffusers"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """Library modules ``path`` imports anywhere in its body (relative imports resolved; packages' __init__ files
    count as the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known}


def test_no_import_circles_between_library_modules():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    graph = {name: imported_modules(path, name, known) for name, path in files.items()}
    # packages re-export their children: an edge into a package's __init__ is not a circle with its own children
    circles = []
    for a, targets in graph.items():
        for b in targets:
            if b == a or a.startswith(b + ".") or b.startswith(a + "."):
                continue
            if a in graph.get(b, set()):
                circles.append(tuple(sorted((a, b))))
    assert not sorted(set(circles)), f"modules importing each other: {sorted(set(circles))}"


# Data tables, not code: the 1000 ImageNet class names.
LONG_MODULES = {"pipelines/imagenet_classes.py"}
MAX_LINES = 550


def test_no_library_module_is_too_long():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_MODULES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by responsibility): {too_long}"
    assert all(name in lengths for name in LONG_MODULES)  # the exceptions still exist
