"""Unreadable training samples: found cheaply when a data set is built, replaced deterministically when they fail
later, counted, and fatal only above a fraction.

Policy (both trainers):

- When a data set is built, every image is checked: the file exists, is not empty, PIL recognises it and its
  data is complete (PNG and others: ``Image.verify``, which reads every chunk; JPEG: the end-of-image marker, or
  where it is missing a draft decode at 1/8 scale, which reads every scan). Rows that fail are dropped from the data set and recorded here, each with a logger
  warning naming the file.
- A sample that passes the check but still fails to decode during training is replaced by the next readable
  index (``i + 1, i + 2, ...`` modulo the data set length): the replacement depends only on the index, so a resumed
  run sees exactly the samples of an uninterrupted one. It is recorded the first time it fails in a process.
  DataLoader workers keep their own records (their warnings still name the file); the end-of-run summary counts
  what the main process saw.
- The run stops with a ValueError as soon as the skipped fraction exceeds ``max_fraction``.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.05


@dataclass
class SkippedSample:
    name: str  # the file (or "row i of <source>" for images stored inside a data set)
    reason: str
    kept: bool = False  # True for samples kept despite the problem (e.g. an empty caption allowed by a flag)


@dataclass
class BadSampleLog:
    """What a data set skipped (or kept with a warning) out of ``total`` candidate samples."""

    source: str
    total: int = 0
    max_fraction: float = DEFAULT_MAX_BAD_FRACTION
    entries: list[SkippedSample] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= float(self.max_fraction) <= 1.0:
            raise ValueError(f"max_bad_sample_fraction must be in [0, 1], got {self.max_fraction}")

    @property
    def skipped(self) -> list[SkippedSample]:
        return [e for e in self.entries if not e.kept]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def add(self, name: str, reason: str, kept: bool = False, when: str = "", check: bool = True) -> None:
        """Record one problem sample, warn (naming it), and (with ``check``) raise once the skipped fraction is too
        large. Build-time scans pass ``check=False`` and call :meth:`check` at the end, so the error lists them all."""
        self.entries.append(SkippedSample(name, reason, kept))
        action = "kept" if kept else "skipped"
        logger.warning(
            "%s %s: %s (%d of %d samples of %s skipped so far%s)",
            action, name, reason, self.num_skipped, self.total, self.source, f", {when}" if when else "",
        )
        if check and not kept:
            self.check()

    def check(self) -> None:
        """ValueError if more than ``max_fraction`` of the samples are skipped."""
        if self.total and self.num_skipped / self.total > self.max_fraction:
            listed = "; ".join(f"{e.name}: {e.reason}" for e in self.skipped[:5])
            more = f" (and {self.num_skipped - 5} more)" if self.num_skipped > 5 else ""
            raise ValueError(
                f"{self.num_skipped} of {self.total} samples of {self.source} are unusable "
                f"({self.num_skipped / self.total:.1%} > max_bad_sample_fraction {self.max_fraction:.1%}): "
                f"{listed}{more}. Fix or remove these files, or raise max_bad_sample_fraction."
            )

    def summary(self) -> str:
        kept = len(self.entries) - self.num_skipped
        text = f"{self.source}: {self.num_skipped} of {self.total} samples skipped"
        if kept:
            text += f", {kept} kept with a warning"
        if self.entries:
            shown = ", ".join(f"{e.name} ({e.reason})" for e in self.entries[:10])
            text += f": {shown}" + (f", ... ({len(self.entries) - 10} more)" if len(self.entries) > 10 else "")
        return text


def image_problem(path: str | None = None, data: bytes | None = None) -> str | None:
    """Why an image file (``path``) or encoded image (``data``) cannot be used, or None if it looks complete."""
    if data is None:
        if path is None:
            return "no image"
        if not os.path.isfile(path):
            return "file not found"
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    elif len(data) == 0:
        return "empty image (0 bytes)"
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            if image.format == "JPEG":
                if _jpeg_tail(path, data) != b"\xff\xd9":  # no end-of-image marker: truncated, or trailing bytes
                    image.draft(image.mode, (1, 1))  # decode at 1/8 scale: cheap, but reads every scan
                    image.load()
            else:
                image.verify()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error ... for broken files
        return f"unreadable ({type(err).__name__}: {err})"
    return None


def _jpeg_tail(path: str | None, data: bytes | None) -> bytes:
    if data is not None:
        return bytes(data[-2:])
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2)


def scan_image_column(ds, column: str, log: BadSampleLog, source: str) -> list[int]:
    """Check every image of a datasets ``Image`` column without decoding it fully; -> the readable row indices.

    Rows that fail are recorded in ``log``; then ValueError if too many did. Columns of another type are not
    checked (all rows returned)."""
    import datasets

    if not isinstance(ds.features[column], datasets.Image):
        return list(range(len(ds)))
    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    good = []
    chunk = 256
    for start in range(0, len(raw), chunk):
        for offset, ref in enumerate(raw[start : start + chunk][column]):
            row = start + offset
            ref = ref or {}
            path, data = ref.get("path"), ref.get("bytes")
            problem = image_problem(path=path, data=data)
            if problem is None:
                good.append(row)
            else:
                name = path if path and data is None else (f"{path} (row {row} of {source})" if path else f"row {row} of {source}")
                log.add(name, problem, when="found when the data set was built", check=False)
    log.check()
    return good


class ReplaceUnreadable:
    """Mixin for map-style data sets: ``load_replacing(index, load)`` returns ``load(i)`` for the first readable
    ``i`` among ``index, index + 1, ...`` (mod len); failures are recorded in ``self.bad_samples`` once per
    process. Subclasses set ``bad_samples`` and implement ``sample_name(i)``."""

    bad_samples: BadSampleLog

    def sample_name(self, index: int) -> str:
        return f"sample {index} of {self.bad_samples.source}"

    def load_replacing(self, index: int, load):
        failed = self.__dict__.setdefault("_failed_indices", set())
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if i in failed:
                continue
            try:
                return load(i)
            except Exception as err:  # a decode failure of one sample must not end the run
                failed.add(i)
                self.bad_samples.add(
                    self.sample_name(i), f"unreadable ({type(err).__name__}: {err})",
                    when=f"found during training, sample {i} replaced by the next readable one",
                )
        raise ValueError(f"no readable sample left in {self.bad_samples.source}")


def report_bad_samples(dataset) -> str | None:
    """Print (main process) and return the end-of-run summary of ``dataset.bad_samples``; None for data sets
    that keep no record (latent shards)."""
    log = getattr(dataset, "bad_samples", None)
    if log is None:
        return None
    from accelerate import PartialState

    text = f"bad samples: {log.summary()}"
    if PartialState().is_main_process:
        print(text, flush=True)
    return text
