"""Training configuration: a dataclass filled from a YAML file and ``--key value`` command-line overrides.

Every trainer setting is a field of a config dataclass with a type hint and a one-line help
(``dataclasses.field(metadata={"help": ...})``, as transformers' HfArgumentParser reads it; :func:`setting` writes
it). :func:`load_config` reads YAML + overrides, converts every value to its field's type and runs the range checks
(each config class's ``validate(self) -> list[str]``, combined over the class's MRO by :func:`config_problems`);
every problem found, whatever its kind, is reported in ONE :class:`ConfigError`, one ``key: problem`` line each.
The trainers call :func:`check_config` again first thing, before any data set scan or model load, so configs built
in Python are checked as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import textwrap
import types
import typing
from typing import Any, Literal, Sequence, Union

import yaml


#: Short command-line spellings: ``--resume latest`` is ``--resume_from_checkpoint latest``.
KEY_ALIASES = {"resume": "resume_from_checkpoint"}
_TRUE, _FALSE = ("true", "yes", "y", "on", "1"), ("false", "no", "n", "off", "0")


class ConfigError(ValueError):
    """Every problem of a config at once: ``problems`` is a list of ``"key: problem"`` lines."""

    def __init__(self, problems: Sequence[str], name: str = "config"):
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__(f"{count} in the {name} settings:\n" + "\n".join(f"  {p}" for p in self.problems))


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its one-line ``--help`` text (``metadata={"help": ...}``, as HfArgumentParser reads)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclasses.dataclass
class HubExportConfig:
    """Where a trainer's exported pipeline goes besides output_dir (both trainers' settings)."""

    push_to_hub: bool = setting(False, "push the exported pipeline to the Hub")
    hub_model_id: str | None = setting(None, "Hub repo id (default: output_dir's name)")
    self_contained_export: bool = setting(
        False, "write the exported pipeline folder (and the pushed repo) with the library's code next to the weights, "
        "so plain diffusers loads it with trust_remote_code=True (a whole pipeline: for FLUX a full finetune or "
        "fuse_lora_on_export)"
    )


# ------------------------------------------------------------------------------------------ type hints


class _Mismatch(Exception):
    """A value that does not fit a type hint (the message completes ``key: ...``)."""


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def type_name(hint) -> str:
    """``int``, ``float | None``, ``list[float] | str | None``, ``{'no', 'fp16', 'bf16'}``."""
    if hint is type(None):
        return "None"
    if _is_union(hint):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "{" + ", ".join(repr(a) for a in typing.get_args(hint)) + "}"
    if typing.get_origin(hint) in (list, dict):
        args = typing.get_args(hint)
        name = typing.get_origin(hint).__name__
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _admits_bool(hint) -> bool:
    return hint is bool or (_is_union(hint) and bool in typing.get_args(hint))


def coerce(value: Any, hint, raw: str | None = None) -> Any:
    """``value`` converted to type ``hint``, or :class:`_Mismatch`.

    ``raw`` is the command-line text that YAML parsed into ``value``: a ``str`` field takes it as written (``--x no``
    stays ``"no"``, ``--x 2024`` stays ``"2024"``). Ints are taken for floats, ``"1e-4"`` (a string in YAML 1.1) is a
    float, booleans take true/false/yes/no/on/off/1/0, list/dict elements are converted to their hinted types.
    """
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch(f"must be null, got {value!r}")
    if _is_union(hint):
        members = typing.get_args(hint)
        errors = {}
        for use_raw in (False, True):  # a member that takes the parsed value first; the raw text only as a fallback
            for member in members:
                try:
                    return coerce(value, member, raw if use_raw else None)
                except _Mismatch as e:
                    errors[member] = str(e)
        # a list given for the one list member (or a value for X | None): that member's precise message
        same_kind = [m for m in members if m is not type(None) and (
            (typing.get_origin(m) or m) in (list, dict) and isinstance(value, typing.get_origin(m) or m)
            or len(members) == 2 and type(None) in members)]
        if len(same_kind) == 1:
            raise _Mismatch(errors[same_kind[0]] + ("" if value is None else " (or null)" * (type(None) in members)))
        raise _Mismatch(f"must be {type_name(hint)}, got {value!r}" + _yaml_bool_hint(value))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        for candidate in (value, raw):
            if any(type(candidate) is type(c) and candidate == c for c in choices):
                return candidate
        raise _Mismatch(f"must be one of {', '.join(map(repr, choices))}, got {value!r}" + _yaml_bool_hint(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _Mismatch(f"must be a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch(f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if raw is not None:
            return raw
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"must be a string, got {value!r}" + _yaml_bool_hint(value))
    origin = typing.get_origin(hint) or hint
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"must be a list ({type_name(hint)}, e.g. [a, b]), got {value!r}")
        (element,) = typing.get_args(hint) or (Any,)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(coerce(item, element))
            except _Mismatch as e:
                raise _Mismatch(f"element {i} {e}") from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"must be a mapping ({type_name(hint)}, e.g. {{a: 1}}), got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        try:
            return {coerce(k, key_hint): coerce(v, value_hint) for k, v in value.items()}
        except _Mismatch as e:
            raise _Mismatch(f"entry {e}") from None
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(f"must be a {hint.__name__}, got {value!r}")
    return value  # a hint this checker does not know: taken as given


def _yaml_bool_hint(value) -> str:
    return " (YAML reads yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""


def did_you_mean(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------------------------------ checks


def config_problems(config) -> list[str]:
    """Every ``key: problem`` of a config instance: values that do not fit their type hints, then the range and
    consistency checks of each class's own ``validate(self) -> list[str]`` (base classes first, over the MRO).
    The range checks see only well-typed values: a field that fails its type check is given its default for them."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    problems, fixed = [], {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        try:
            value = coerce(getattr(config, f.name), hints[f.name])
        except _Mismatch as e:
            problems.append(f"{f.name}: {e}")
            value = _default(f)
        fixed[f.name] = value
    checked = dataclasses.replace(config, **fixed)
    for klass in reversed(cls.__mro__):
        validate = klass.__dict__.get("validate")
        if validate is not None:
            problems.extend(validate(checked))
    return list(dict.fromkeys(problems))


def check_config(config) -> None:
    """Raise :class:`ConfigError` listing every problem of ``config`` (no-op for a valid one)."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems, type(config).__name__)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# Range checks shared by the config classes' validate methods: each returns "key: problem" lines.


def require(condition: bool, key: str, problem: str) -> list[str]:
    return [] if condition else [f"{key}: {problem}"]


def positive_int(config, *keys: str, allow_zero: bool = False, optional: bool = False) -> list[str]:
    """``key: must be >= 1`` (or >= 0) for each int ``key``; None passes when ``optional``."""
    out = []
    for key in keys:
        value = getattr(config, key)
        if value is None and optional:
            continue
        low = 0 if allow_zero else 1
        if value is None or value < low:
            out.append(f"{key}: must be an integer >= {low}, got {value!r}")
    return out


def finite(config, *keys: str, low: float | None = None, high: float | None = None, low_open=False, high_open=False,
           optional: bool = False) -> list[str]:
    """Each float ``key`` is finite and inside [low, high] (``low_open`` / ``high_open`` exclude the end)."""
    out = []
    for key in keys:
        value = getattr(config, key)
        if value is None and optional:
            continue
        ok = value is not None and math.isfinite(value)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
            out.append(f"{key}: must be a number in {interval}, got {value!r}")
    return out


#: Stage-list settings and how many entries they hold for S stages.
PER_STAGE_KEYS = ("stage_weights", "stage_loss_weights", "steps_per_stage", "stage_scales")
PER_BOUNDARY_KEYS = ("stage_thresholds", "stage_factors")


def stage_list_problems(config, num_stages: int | None) -> list[str]:
    """Entries of the stage lists the config has (``stage_weights``, ``steps_per_stage``, ``stage_thresholds``, ...):
    their values always, their lengths (S per-stage entries, S - 1 between stages) when ``num_stages`` is known."""
    out = []
    for key in PER_STAGE_KEYS + PER_BOUNDARY_KEYS:
        value = getattr(config, key, None)
        if not isinstance(value, list):  # None: the default; an int / "auto": checked by the field's own class
            continue
        want = num_stages if key in PER_STAGE_KEYS else (num_stages - 1 if num_stages else None)
        what = "num_stages" if key in PER_STAGE_KEYS else "num_stages - 1"
        if want is not None and len(value) != want:
            out.append(f"{key}: must hold {what} = {want} entries, got {len(value)}: {value}")
        if key in ("stage_weights", "stage_scales") and any(not (math.isfinite(v) and v > 0) for v in value):
            out.append(f"{key}: entries must be positive numbers, got {value}")
        if key == "stage_loss_weights" and any(not (math.isfinite(v) and v >= 0) for v in value):
            out.append(f"{key}: entries must be numbers >= 0, got {value}")
        if key == "steps_per_stage" and any(n < 1 for n in value):
            out.append(f"{key}: entries must be integers >= 1, got {value}")
        if key == "stage_thresholds" and any(not 0.0 < t < 1.0 for t in value):
            out.append(f"{key}: entries must be sigmas strictly inside (0, 1), got {value}")
        if key == "stage_factors" and any(f < 2 for f in value):
            out.append(f"{key}: entries must be integers >= 2, got {value}")
    from ..data.band_stats import STAGE_SCALE_MODES

    scales = getattr(config, "stage_scales", None)
    if isinstance(scales, str) and scales not in STAGE_SCALE_MODES:
        out.append(f"stage_scales: must be null, S positive numbers or one of {STAGE_SCALE_MODES}, got {scales!r}"
                   f"{did_you_mean(scales, STAGE_SCALE_MODES)}")
    if hasattr(config, "stage_scales_samples"):
        out += positive_int(config, "stage_scales_samples")
    factors = getattr(config, "stage_factors", None)
    if isinstance(factors, int) and not isinstance(factors, bool) and factors < 2:
        out.append(f"stage_factors: must be an integer >= 2 (or a list of them), got {factors}")
    return out


# ------------------------------------------------------------------------------------------ loading


_NO_VALUE = object()  # a non-boolean key given bare on the command line


def _parse_overrides(hints: dict, overrides: Sequence[str], problems: list[str]) -> dict[str, tuple[Any, str | None]]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` -> {key: (YAML-parsed value, raw text)}."""
    values = {}
    args = [str(a) for a in overrides]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            problems.append(f"{arg}: unexpected argument (settings are written --key value)")
            continue
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            key, raw = arg[2:], None
            if i < len(args) and not args[i].startswith("--"):
                raw = args[i]
                i += 1
        key = key.replace("-", "_")
        key = KEY_ALIASES.get(key, key)
        if raw is None:
            # a bare boolean flag is true, as with diffusers' store_true options; other keys need a value
            values[key] = (True, None) if key not in hints or _admits_bool(hints[key]) else (_NO_VALUE, None)
            continue
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        values[key] = (parsed, raw)
    return values


def load_config(cls, config_path: str | None = None, overrides: Sequence[str] = ()):
    """Build dataclass ``cls`` from an optional YAML file, then ``--key value`` / ``--key=value`` overrides.

    Values are parsed as YAML (``--stage_weights "[0.8, 0.2]"``, ``--use_ema false``); dashes in keys may be written
    as underscores or dashes; a boolean key given bare (``--gradient_checkpointing``) is true. Then every value is
    converted to its field's type and the config's range checks run. Raises :class:`ConfigError` (a ValueError)
    naming every problem: unknown keys (with a did-you-mean), wrong types, out-of-range or inconsistent values.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    problems: list[str] = []
    values: dict[str, tuple[Any, str | None]] = {}
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            loaded = None
            problems.append(f"config: cannot read {config_path}: {e.strerror or e}")
        except yaml.YAMLError as e:
            loaded = None
            problems.append(f"config: {config_path} is not valid YAML: {e}")
        if loaded is not None and not isinstance(loaded, dict):
            problems.append(f"config: {config_path} must hold a mapping of settings, got {type(loaded).__name__}")
        elif loaded:
            values.update({KEY_ALIASES.get(str(k), str(k)): (v, None) for k, v in loaded.items()})
    values.update(_parse_overrides(hints, overrides, problems))
    kwargs = {}
    for key, (value, raw) in values.items():
        if key not in fields:
            problems.append(f"{key}: unknown setting{did_you_mean(key, fields)}; `--help` lists them all")
            continue
        if value is _NO_VALUE:
            problems.append(f"{key}: needs a value (--{key} VALUE)")
            continue
        try:
            kwargs[key] = coerce(value, hints[key], raw)
        except _Mismatch as e:
            problems.append(f"{key}: {e}")
    config = cls(**kwargs)
    problems.extend(p for p in config_problems(config) if p not in problems)
    if problems:
        raise ConfigError(problems, cls.__name__)
    return config


def flat_hparams(config) -> dict[str, Any]:
    """Scalars only (lists and None as strings), for TensorBoard's hparams."""
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


# ------------------------------------------------------------------------------------------ command line


def field_help(cls, name: str) -> str:
    """The field's help text: its own metadata, else that of the base class that declared it first."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


def format_help(cls, description: str | None = None, prog: str | None = None) -> str:
    """``--help``: every field with its type, default and help, grouped by the class that declares it."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _split_lines(self, text, width):  # no breaks at hyphens: "flow-matching", "--key" stay whole
            return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=Formatter,
        usage="%(prog)s [--config PATH] [--key VALUE ...] [--bool_key [true|false] ...]", add_help=False,
        epilog="YAML values first, then the command line. A boolean key given bare (--use_ema) is true. Lists and "
        "mappings are written in YAML: --stage_weights '[0.8, 0.2]'. All problems are reported at once.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    parser.add_argument("--config", metavar="PATH", help=f"YAML file of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    groups = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        owner = next(k for k in reversed(cls.__mro__) if f.name in getattr(k, "__annotations__", {}))
        if owner not in groups:
            title = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
            groups[owner] = parser.add_argument_group(f"{owner.__name__}: {title}")
        text = f"{field_help(cls, f.name)} (default: {_default(f)!r})".replace("%", "%%")
        groups[owner].add_argument(f"--{f.name}", metavar=type_name(hints[f.name]), help=text)
    return parser.format_help()


def parse_cli(cls, argv=None, description: str | None = None):
    """The trainers' command line: ``--config <yaml>`` plus ``--key value`` overrides -> a ``cls`` instance.

    ``-h`` / ``--help`` prints every setting (type, default, help) and exits; bad settings raise :class:`ConfigError`
    naming all of them (the scripts turn it into an error message and exit status 2)."""
    args = list(sys.argv[1:] if argv is None else [str(a) for a in argv])
    if "-h" in args or "--help" in args:
        print(format_help(cls, description, prog=os.path.basename(sys.argv[0]) if argv is None else None))
        raise SystemExit(0)
    config_path, overrides, i = None, [], 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            config_path, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            config_path, i = args[i].split("=", 1)[1], i + 1
        else:
            overrides.append(args[i])
            i += 1
    return load_config(cls, config_path, overrides)


#: Errors a user can act on (a bad setting, a missing or bad data set, a folder in use): one message, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def run_cli(main: typing.Callable[[], Any]) -> None:
    """Run a script's ``main()`` the way a user expects a command to end: a :class:`ConfigError` with the list of
    problems and exit status 2; any other user error (:data:`USER_ERRORS`, an output folder held by a live run) with
    its one message and exit status 1; Ctrl+C with how to resume and exit status 130. ``--debug`` anywhere on the
    command line (removed before ``main`` parses it) shows the traceback instead."""
    from .checkpointing import OutputDirLockedError, TrainingInterrupted

    prog = os.path.basename(sys.argv[0])
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--debug"]
    try:
        main()
    except ConfigError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: aborted (Ctrl+C)", file=sys.stderr)
        raise SystemExit(130) from None
    except (*USER_ERRORS, OutputDirLockedError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}\n(run again with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
