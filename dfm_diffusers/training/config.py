"""Training configuration: a dataclass filled from a YAML file and ``--key value`` command-line overrides."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence

import yaml


#: Short command-line spellings: ``--resume latest`` is ``--resume_from_checkpoint latest``.
KEY_ALIASES = {"resume": "resume_from_checkpoint"}


def load_config(cls, config_path: str | None = None, overrides: Sequence[str] = ()):
    """Build dataclass ``cls`` from an optional YAML file, then ``--key value`` / ``--key=value`` overrides.

    Values are parsed as YAML (``--stage_weights "[0.8, 0.2]"``, ``--use_ema false``); dashes in keys may be
    written as underscores or dashes. Unknown keys raise ValueError naming the known ones. Float fields also
    accept YAML's strings for exponent numbers without a dot (``1e-4`` is a string in YAML 1.1).
    """
    values: dict[str, Any] = {}
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            values.update(yaml.safe_load(f) or {})
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        key = key.replace("-", "_")
        values[KEY_ALIASES.get(key, key)] = yaml.safe_load(raw)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _coerce_float(key, value, hints.get(key))
    return cls(**values)


def _coerce_float(key: str, value: Any, hint) -> Any:
    """``"1e-4"`` -> 1e-4 for float-typed fields (PyYAML reads exponent numbers without a dot as strings)."""
    if not isinstance(value, str) or not (hint is float or float in typing.get_args(hint)):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def flat_hparams(config) -> dict[str, Any]:
    """Scalars only (lists and None as strings), for TensorBoard's hparams."""
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def parse_cli(cls, argv=None, description: str | None = None):
    """The trainers' command line: ``--config <yaml>`` plus ``--key value`` overrides -> a ``cls`` instance.
    Bad keys or values end in argparse's usage error."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of {cls.__name__} fields")
    args, overrides = parser.parse_known_args(argv)
    try:
        return load_config(cls, args.config, overrides)
    except ValueError as e:
        parser.error(str(e))
