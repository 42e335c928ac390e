"""Self-contained pipeline folders: the library's own code written next to the weights, so that plain diffusers loads
them with ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` (and a model alone with
``AutoModel.from_pretrained(..., subfolder="transformer", trust_remote_code=True)``), without dfm-diffusers installed.

diffusers' convention for custom code: ``model_index.json`` names ``[module, class]`` for the pipeline (module at the
root) and for every custom component (module in the component's subfolder); a model's ``config.json`` may map
``AutoModel`` to ``module.Class`` (``auto_map``). The modules are diffusers "dynamic modules": copied into one flat
package, so relative imports must be flat (``from .x import y``), and for a local folder diffusers copies only the
entry module's *direct* relative imports.

Layout written here, for a pipeline whose code is the library's:
- every library module the pipeline (or component) class needs, transitively, as ``dfm_<subpackage>_<name>.py``
  (e.g. ``dfm_models_stage_layers.py``), its source unchanged except that intra-package imports become flat
  relative imports of those files;
- a small entry module named like the library module (``pipeline_dfm.py`` at the root, ``transformer/
  transformer_dfm_flux.py``, ``scheduler/scheduling_dfm.py``) that imports the class and, once each, every module of
  its closure (which makes diffusers copy them all). The entry modules of the components import the very modules
  the pipeline imported, so a pipeline and its components share one class object per class.

The library itself loads such folders with its own installed classes (:func:`library_model_index`), never with
the copied code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import sys

#: The installed library's top-level package (the code below also runs as a copied module; then it is not this).
LIBRARY = "dfm_diffusers"


def running_as_library() -> bool:
    """True when this module is the installed library's (not a copy loaded by diffusers as remote code)."""
    return __name__.split(".")[0] == LIBRARY


def self_contained_signature(base) -> inspect.Signature:
    """``base``'s signature (a save_pretrained) with a keyword-only ``self_contained`` before its ``**kwargs``, for
    overrides that add it: diffusers passes ``safe_serialization`` / ``variant`` / ... to a component's save_pretrained
    only if its signature names them."""
    params = list(inspect.signature(base).parameters.values())
    extra = inspect.Parameter("self_contained", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="bool | None")
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return inspect.Signature(params[:at] + [extra] + params[at:])


def _module_file(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or not spec.origin or spec.origin in ("built-in", "frozen") else spec.origin


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def flat_name(module: str) -> str:
    """File stem of a library module in a self-contained folder: ``dfm_diffusers.models.stage_layers`` ->
    ``dfm_models_stage_layers``; a module that is already such a copy keeps its name."""
    parts = module.split(".")
    if parts[0] == LIBRARY:
        return "_".join(["dfm", *parts[1:]]) if len(parts) > 1 else "dfm"
    return parts[-1]


def _resolve(module: str, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` written in ``module`` (a module, not a package)."""
    base = module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _defining_module(package: str, name: str) -> str:
    """The module that ``from package import name`` takes ``name`` from (following the package's re-exports)."""
    if _module_file(f"{package}.{name}") is not None and not _is_package(f"{package}.{name}"):
        return f"{package}.{name}"
    init = _module_file(package)
    tree = ast.parse(open(init, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _resolve(f"{package}.__init__", node.level, node.module)
                    if _is_package(source):
                        return _defining_module(source, alias.name)
                    return source
    # a lazily exporting package (dfm_diffusers.utils.lazy_exports): ask the object where it is defined
    home = getattr(getattr(importlib.import_module(package), name, None), "__module__", None)
    if home and home.startswith(f"{package}."):
        return home
    return package  # defined in the package's __init__ itself


def _internal_imports(module: str, tree: ast.Module, root: str):
    """(node, [(alias, defining module or None for a module import)]) for every import of ``root``'s own code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] == root for alias in node.names):
                raise ValueError(f"{module}: `import {root}...` cannot be made self-contained; use `from ... import`")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and (node.module or "").split(".")[0] != root:
            continue
        target = node.module if node.level == 0 else _resolve(module, node.level, node.module)
        resolved = []
        for alias in node.names:
            if alias.name == "*":
                raise ValueError(f"{module}: `from {target} import *` cannot be made self-contained")
            if _is_package(target):
                sub = f"{target}.{alias.name}"
                if _module_file(sub) is not None:
                    resolved.append((alias, sub, True))
                else:
                    resolved.append((alias, _defining_module(target, alias.name), False))
            else:
                resolved.append((alias, target, False))
        yield node, resolved


def _rewrite(module: str, source: str, root: str) -> tuple[str, set[str]]:
    """``source`` with its intra-package imports made flat; returns (new source, modules it imports)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits, needed = [], set()
    for node, resolved in _internal_imports(module, tree, root):
        indent = " " * node.col_offset
        groups: dict[str, list[str]] = {}
        statements = []
        for alias, target, is_module in resolved:
            needed.add(target)
            if is_module:
                statements.append(f"{indent}from . import {flat_name(target)} as {alias.asname or alias.name}\n")
            else:
                name = alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                groups.setdefault(flat_name(target), []).append(name)
        statements += [f"{indent}from .{flat} import {', '.join(names)}\n" for flat, names in groups.items()]
        edits.append((node.lineno - 1, node.end_lineno, statements))
    for start, end, statements in sorted(edits, reverse=True):
        lines[start:end] = statements
    return "".join(lines), needed


def module_closure(entry: str) -> dict[str, str]:
    """{flat file stem: flattened source} of ``entry`` and every module of its package it imports, transitively
    (imports inside functions included)."""
    root = entry.split(".")[0]
    todo, done, files = [entry], set(), {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        path = _module_file(module)
        if path is None:
            raise ValueError(f"cannot find the source of {module}")
        with open(path, encoding="utf-8") as f:
            source, needed = _rewrite(module, f.read(), root)
        stem = flat_name(module)
        if stem in files:
            raise ValueError(f"two modules map to {stem}.py in a self-contained folder")
        files[stem] = source
        todo.extend(sorted(needed - done))
    return files


def _first_public_name(source: str) -> str:
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
            return node.name
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
    raise ValueError("a module without a public top-level name cannot be imported by the entry module")


def entry_module(cls: type, entry_name: str, files: dict[str, str]) -> str:
    """Source of the entry module ``entry_name``.py exposing ``cls`` (its closure in ``files``)."""
    version = getattr(sys.modules.get(LIBRARY), "__version__", None) if running_as_library() else None
    written_by = f"dfm-diffusers {version}" if version else "a copy of dfm-diffusers"
    home = flat_name(cls.__module__)
    lines = [
        f'"""{cls.__name__} for diffusers\' remote-code loading (`trust_remote_code=True`), written by '
        f'{written_by}.\n\nThe code is the library\'s, in the dfm_*.py files next to this one (their imports made '
        f'flat); each is imported below\nbecause diffusers copies only the relative imports of this module."""\n',
        "\n",
        f"from .{home} import {cls.__name__}  # noqa: F401\n",
    ]
    for stem in sorted(files):
        if stem != home:
            lines.append(f"from .{stem} import {_first_public_name(files[stem])} as _{stem}  # noqa: F401\n")
    return "".join(lines)


def _entry_name(cls: type) -> str:
    """The entry module's name: the class's own module name without the package (pipeline_dfm, scheduling_dfm)."""
    stem = cls.__module__.split(".")[-1]
    return stem[len("dfm_"):].split("_", 1)[1] if stem.startswith("dfm_") and "_" in stem[4:] else stem


def write_code(folder: str, cls: type) -> tuple[str, list[str]]:
    """Write ``cls``'s module closure and its entry module into ``folder``; returns (entry module name, files)."""
    files = module_closure(cls.__module__)
    entry = _entry_name(cls)
    files[entry] = entry_module(cls, entry, files)
    for stem, source in files.items():
        with open(os.path.join(folder, f"{stem}.py"), "w", encoding="utf-8") as out:
            out.write(source)
    return entry, sorted(f"{stem}.py" for stem in files)


def _update_json(path: str, update) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    update(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_self_contained_model(model, folder: str) -> list[str]:
    """Make a saved model folder self-contained: its code next to config.json, which maps ``AutoModel`` to it
    (``AutoModel.from_pretrained(folder, trust_remote_code=True)``). Returns the files written."""
    entry, files = write_code(folder, type(model))
    _update_json(os.path.join(folder, "config.json"),
                 lambda config: config.update(auto_map={"AutoModel": f"{entry}.{type(model).__name__}"}))
    return files


def write_self_contained(pipeline, folder: str) -> list[str]:
    """Make the saved pipeline folder ``folder`` self-contained (see the module docstring): module files, entries
    of ``model_index.json`` and ``auto_map`` of the custom models' ``config.json``. Returns the files written."""
    root = type(pipeline).__module__.split(".")[0]
    entry, written = write_code(folder, type(pipeline))
    entries = {"_class_name": [entry, type(pipeline).__name__]}
    for name, component in pipeline.components.items():
        if component is None or type(component).__module__.split(".")[0] != root:
            continue
        sub = os.path.join(folder, name)
        if os.path.isfile(os.path.join(sub, "config.json")):
            files = write_self_contained_model(component, sub)
        else:
            files = write_code(sub, type(component))[1]
        entries[name] = [_entry_name(type(component)), type(component).__name__]
        written += [os.path.join(name, f) for f in files]
    _update_json(os.path.join(folder, "model_index.json"), lambda index: index.update(entries))
    return sorted(written)


def library_model_index(index: dict, folder: str) -> dict:
    """``model_index.json`` of a self-contained folder with its pipeline and custom components pointed at the
    installed library's modules, so that the library loads its own classes (the folder's copied code is not run).
    Other indexes come back unchanged."""
    if not running_as_library():
        return index
    library = sys.modules.get(LIBRARY) or importlib.import_module(LIBRARY)
    mapped = dict(index)
    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)) and hasattr(library, class_name[-1]):
        if os.path.isfile(os.path.join(folder, f"{class_name[0]}.py")):
            mapped["_class_name"] = class_name[-1]
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
            continue
        module, cls_name = spec
        if "." not in module and hasattr(library, cls_name) and os.path.isfile(os.path.join(folder, name, f"{module}.py")):
            mapped[name] = [getattr(library, cls_name).__module__, cls_name]
    return mapped
