"""Pre-encoded VAE latents in safetensors shards: the encoder (``python -m dfm_diffusers.data encode``) and the
training data set that reads them.

Layout of an output folder::

    dfm_latents.json              metadata: VAE id, scaling/shift, count, num_classes, shapes, encoding settings
    shard-00000.safetensors       "latents" [n, C, h, w] and "class_labels" [n] (int64) of samples 0 .. n-1
    shard-00001.safetensors       ...

Latents are stored already normalized, ``(z - shift_factor) * scaling_factor``, i.e. the space diffusion models are
trained in; decode with ``vae.decode(latents / scaling_factor + shift_factor)``. Encoding is resumable: a shard is
written under a temporary name and renamed when complete, and a rerun skips every shard already written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LATENT_METADATA_FILE = "dfm_latents.json"
LATENT_FORMAT = "dfm-latent-shards"
LATENT_FORMAT_VERSION = 1
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_latent_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`.encoding.encode_latent_shards`."""
    return os.path.isfile(os.path.join(os.fspath(path), LATENT_METADATA_FILE))


def shard_path(output_dir: str | os.PathLike, index: int) -> str:
    return os.path.join(os.fspath(output_dir), f"{_SHARD_PREFIX}{index:05d}{_SHARD_SUFFIX}")


def _shard_files(output_dir: str) -> dict[int, str]:
    found = {}
    for name in os.listdir(output_dir):
        if name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX):
            stem = name[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)]
            if stem.isdigit():
                found[int(stem)] = os.path.join(output_dir, name)
    return found


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, LATENT_METADATA_FILE)
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read {meta_path}: {err}") from err
    if metadata.get("format") != LATENT_FORMAT or metadata.get("version") != LATENT_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} is not a {LATENT_FORMAT} v{LATENT_FORMAT_VERSION} file "
            f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    return metadata


def _shard_is_complete(path: str, start: int, count: int) -> bool:
    """A shard counts as written if its header says it holds samples start .. start+count-1."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception:  # unreadable / truncated file: rewrite it
        return False
    return meta.get("start") == str(start) and meta.get("count") == str(count) and {"latents", "class_labels"} <= keys


def _save_shard(output_dir: str, shard: int, start: int, latents: torch.Tensor, labels: torch.Tensor) -> None:
    """Write one shard under a temporary name, then rename it (a killed write leaves no shard)."""
    tmp = f"{shard_path(output_dir, shard)}.tmp-{os.getpid()}"
    save_file(
        {"latents": latents.contiguous(), "class_labels": labels.long().contiguous()}, tmp,
        metadata={"format": LATENT_FORMAT, "start": str(start), "count": str(len(latents))},
    )
    os.replace(tmp, shard_path(output_dir, shard))


def write_latent_shards(
    output_dir: str | os.PathLike,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    resolution: int,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    shard_size: int = 1024,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
    vae: str = "unknown",
) -> dict:
    """Latents already in the training space (``(z - shift_factor) * scaling_factor``; encoded elsewhere, or
    synthetic for a benchmark) as a shard folder :class:`LatentShardDataset` reads; stored in ``latents``' dtype.

    Args:
        latents: [N, C, h, w] (float32, float16 or bfloat16); class_labels: [N] ints.
        resolution: of the images they stand for; num_classes: default max label + 1.
    Returns the metadata written to ``dfm_latents.json``. Raises ValueError for bad shapes or a non-empty folder.
    """
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(latents.dtype)
    if latents.ndim != 4 or dtype_name is None or class_labels.shape != (len(latents),) or not len(latents):
        raise ValueError(f"need latents [N, C, h, w] ({list(_DTYPES)}) and labels [N], got {latents.dtype} "
                         f"{tuple(latents.shape)} and {tuple(class_labels.shape)}")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if os.listdir(output_dir):
        raise ValueError(f"{output_dir} is not empty; write latent shards into a new folder")
    count = len(latents)
    num_shards = math.ceil(count / shard_size)
    for shard in range(num_shards):
        start = shard * shard_size
        _save_shard(output_dir, shard, start, latents[start : start + shard_size], class_labels[start : start + shard_size])
    metadata = dict(
        format=LATENT_FORMAT, version=LATENT_FORMAT_VERSION, complete=True, count=count, num_shards=num_shards,
        shard_size=shard_size, num_classes=int(num_classes if num_classes is not None else class_labels.max() + 1),
        class_names=list(class_names) if class_names is not None else None, resolution=resolution,
        image_channels=None, vae=vae, vae_subfolder=None, scaling_factor=scaling_factor, shift_factor=shift_factor,
        latent_channels=latents.shape[1], latent_size=list(latents.shape[2:]), latents_dtype=dtype_name,
        encoding=dict(source="tensors"),
    )
    _write_json_atomic(os.path.join(output_dir, LATENT_METADATA_FILE), metadata)
    return metadata


# ------------------------------------------------------------------------------------------------------ encoding


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``z`` -> the space diffusion models are trained in, ``(z - shift_factor) * scaling_factor`` (float32)."""
    shift = vae.config.shift_factor or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, posterior_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Normalized latents ``(z - shift_factor) * scaling_factor`` of images in [-1, 1] (float32).

    ``z`` is the posterior mean, or, with ``posterior_seeds`` (one int per image), a posterior sample
    ``mean + std * eps`` whose eps is drawn on the CPU from a generator seeded with the image's seed (so the
    result does not depend on batching, device or resumption).
    """
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mean
    if posterior_seeds is not None:
        if len(posterior_seeds) != len(z):
            raise ValueError(f"got {len(posterior_seeds)} posterior seeds for {len(z)} images")
        eps = [torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in posterior_seeds]
        z = z + dist.std * torch.stack(eps).to(z)
    return normalize_latents(vae, z)


def posterior_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s posterior noise in an encoding run with ``seed``."""
    return (seed * 1_000_003 + index) % (2**63)


def _load_vae(vae, vae_subfolder, device, dtype):
    from diffusers import AutoencoderKL

    if isinstance(vae, (str, os.PathLike)):
        vae_id = os.path.abspath(vae) if os.path.isdir(vae) else os.fspath(vae)
        try:
            vae = AutoencoderKL.from_pretrained(vae, subfolder=vae_subfolder, dtype=dtype)
        except Exception as err:
            raise ValueError(f"could not load an AutoencoderKL from {vae!r} (subfolder {vae_subfolder!r}): {err}") from err
    else:
        vae_id = vae.config.get("_name_or_path") or f"<in-memory {type(vae).__name__}>"
        vae = vae.to(dtype=dtype)
    return vae.to(device).eval().requires_grad_(False), vae_id


class LatentShardDataset(torch.utils.data.Dataset):
    """The latents written by :func:`.encoding.encode_latent_shards`, read lazily (memory-mapped) shard by shard.

    Items are ``dict(latents=float32 [C, h, w], class_labels=long)``. Attributes: ``num_classes``, ``channels``
    (latent channels), ``latent_size``, ``resolution`` (of the encoded images), ``class_names``,
    ``scaling_factor``, ``shift_factor``, ``vae`` and the full ``metadata``.

    Raises ValueError for a folder that is not a complete, consistent set of shards.
    """

    def __init__(self, path: str | os.PathLike, max_samples: int | None = None):
        self.path = os.fspath(path)
        if not is_latent_dir(self.path):
            raise ValueError(f"{self.path} has no {LATENT_METADATA_FILE}: not a folder of encoded latents")
        meta = _read_metadata(self.path)
        if not meta.get("complete"):
            raise ValueError(
                f"the latents in {self.path} are incomplete (interrupted encoding): rerun the same "
                f"`python -m dfm_diffusers.data encode ... --output {self.path}` command to resume"
            )
        self.metadata = meta
        self.shard_size = int(meta["shard_size"])
        count = int(meta["count"])
        labels = []
        for i in range(int(meta["num_shards"])):
            path_i = shard_path(self.path, i)
            expected = min(self.shard_size, count - i * self.shard_size)
            if not _shard_is_complete(path_i, i * self.shard_size, expected):
                raise ValueError(f"{path_i} is missing or does not hold samples {i * self.shard_size}.. (+{expected})")
            with safe_open(path_i, framework="pt") as f:
                labels.append(f.get_tensor("class_labels"))
        self.class_labels = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
        if len(self.class_labels) != count:
            raise ValueError(f"{self.path}: metadata says {count} samples but the shards hold {len(self.class_labels)}")
        if max_samples is not None:
            self.class_labels = self.class_labels[:max_samples]
        if len(self.class_labels) == 0:
            raise ValueError(f"{self.path} holds no latents")
        self.num_classes = int(meta["num_classes"])
        self.channels = int(meta["latent_channels"])
        self.latent_size = tuple(meta["latent_size"])
        self.resolution = int(meta["resolution"])
        self.class_names = meta.get("class_names")
        self.scaling_factor = meta["scaling_factor"]
        self.shift_factor = meta["shift_factor"]
        self.vae = meta["vae"]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.class_labels)

    def __repr__(self) -> str:
        return (
            f"LatentShardDataset({self.path}: {len(self)} latents {self.channels}x{self.latent_size[0]}x"
            f"{self.latent_size[1]} of {self.resolution}px images, {self.num_classes} classes, vae {self.vae})"
        )

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _shard(self, index: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            self._handles[index] = safe_open(shard_path(self.path, index), framework="pt")
        return self._handles[index]

    @property
    def stored_dtype(self) -> torch.dtype:
        return _DTYPES[self.metadata.get("latents_dtype", "float32")]

    def nbytes(self) -> int:
        """Bytes of all latents as stored (what :meth:`read_all` returns)."""
        return len(self) * self.channels * math.prod(self.latent_size) * self.stored_dtype.itemsize

    def read_all(self, progress: bool = True) -> torch.Tensor:
        """Every latent in one tensor [N, C, h, w] of the stored dtype, read shard by shard (a whole shard at a
        time: no per-sample work). ``self[i]["latents"]`` equals ``read_all()[i].float()``."""
        from tqdm.auto import tqdm

        out = torch.empty((len(self), self.channels, *self.latent_size), dtype=self.stored_dtype)
        num_shards = math.ceil(len(self) / self.shard_size)
        for shard in tqdm(range(num_shards), desc="reading latent shards", unit="shard", disable=not progress):
            start = shard * self.shard_size
            rows = min(self.shard_size, len(self) - start)
            with safe_open(shard_path(self.path, shard), framework="pt") as f:
                out[start : start + rows] = f.get_slice("latents")[:rows]
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard, row = divmod(index, self.shard_size)
        latents = self._shard(shard).get_slice("latents")[row : row + 1][0]
        return dict(latents=latents.float(), class_labels=self.class_labels[index])
