"""Set-up shared by the bench/ scripts: the repository on ``sys.path``, device and dtype, the environment record,
results files that resume, and CUDA-synchronized timing (median of repeats).

A bench script starts with ``sys.path.insert(0, <repository root>)`` (the one line that cannot live here), then
``from bench.common import ...``. Importing this module also puts the repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def use_test_harness() -> None:
    """Put tests/ on ``sys.path``: the offline tiny text encoders and tokenizers of the test harness (conftest)."""
    sys.path.insert(0, TESTS)


# ------------------------------------------------------------------------------------------ device and dtype


def device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    """``torch.device(name)`` and the benches' compute dtype on it: bfloat16 on CUDA, float32 elsewhere."""
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ environment record


def device_name(device: torch.device, cpu: str = "cpu") -> str:
    """The GPU's name on CUDA, else ``cpu`` (each bench keeps the CPU label its results files always had)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu


def cpu_label() -> str:
    """The processor as ``platform`` reports it, or ``"cpu"`` where it reports nothing."""
    return platform.processor() or "cpu"


def versions() -> dict[str, str]:
    """``{"torch": ..., "diffusers": ...}``."""
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


def git_commit() -> str:
    """The repository's short commit hash, or ``"unknown"`` outside a git checkout."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - not a checkout, or no git
        return "unknown"


def now() -> str:
    """Local date and time, ``YYYY-MM-DD HH:MM``."""
    return time.strftime("%Y-%m-%d %H:%M")


def environment(device: torch.device, cpu: str = "cpu") -> dict[str, str]:
    """What a result row records about where it was measured: device name, torch / diffusers versions, commit, date."""
    return dict(device=device_name(device, cpu), **versions(), commit=git_commit(), date=now())


# ------------------------------------------------------------------------------------------ results files


def load_json(path: str, default: Any = None) -> Any:
    """The JSON document at ``path``, or ``default`` when there is none yet (a fresh run)."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file, then a rename): an interrupted run leaves the old one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); ``[]`` when it does not exist yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: str, row: dict) -> None:
    """Append one row to a JSON-lines file (written as soon as an arm finishes, so a re-run can skip it)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def done_keys(path: str, key: Callable[[dict], Any]) -> set:
    """``{key(row)}`` over the rows already in a JSON-lines file: the arms a resumed run skips."""
    return {key(row) for row in read_jsonl(path)}


# ------------------------------------------------------------------------------------------ timing


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())`` with the device synchronized before the clock starts and before it stops."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def repeat_timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> tuple[list[float], Any]:
    """``warmup`` untimed calls, then ``repeats`` timed ones: ``(times in seconds, the last call's output)``."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        seconds, out = timed_call(fn, device)
        times.append(seconds)
    return times, out
