"""On-disk cache of FLUX training inputs: VAE latent distributions and T5 + CLIP prompt embeddings.

Computed once, in batches (progress bar), in the frozen models' dtype, stored as one safetensors file per image /
per distinct caption, and reused by later runs:

- ``<cache_dir>/latents-<key>/<image>.safetensors``: ``latent_dist`` = the VAE posterior's parameters (mean and
  log-variance, [2C, h, w]), so training still draws a fresh latent sample every step, as without the cache;
- ``<cache_dir>/text-<key>/<caption>.safetensors``: ``prompt_embeds`` [L, D] (T5) and ``pooled_prompt_embeds``
  [D] (CLIP), for every caption of the data, the empty prompt (caption dropout and true CFG) and the validation
  prompts.

``<key>`` hashes everything the tensors depend on: the model (``pretrained`` id or folder + revision + ``vae``, and
for local folders the weight files' sizes and modification times), the resolution and crop (latents), the
maximum sequence length (text) and the dtype; ``<image>`` hashes the image file's path, size and modification time
(or the stored bytes), ``<caption>`` the caption text. A change to any of them makes a new key, so stale entries
are never read. Each folder holds ``key.json`` with the readable key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_stamps(root: str, subfolders) -> list:
    """(relative path, size, mtime_ns) of the files of ``subfolders`` of a local pipeline / model folder."""
    stamps = []
    for sub in subfolders:
        folder = os.path.join(root, sub) if sub else root
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                stat = os.stat(path)
                stamps.append([os.path.join(sub, name), stat.st_size, stat.st_mtime_ns])
    return stamps


def _model_key(source: str, revision: str | None, subfolders) -> dict:
    if os.path.isdir(source):
        return {"folder": os.path.realpath(source), "files": _file_stamps(source, subfolders)}
    return {"hub_id": source, "revision": revision or "main"}


def _save_atomic(tensors: dict, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _cache_folder(root: str, kind: str, key: dict) -> str:
    folder = os.path.join(root, f"{kind}-{_digest(key)}")
    os.makedirs(folder, exist_ok=True)
    key_file = os.path.join(folder, "key.json")
    if not os.path.isfile(key_file):
        with open(key_file, "w", encoding="utf-8") as f:
            json.dump(key, f, indent=2, default=str)
    return folder


class FluxEmbeddingCache:
    """The latent and text caches of one training configuration (see the module docstring).

    ``task``: the :class:`.flux_task.FluxTask` (its frozen VAE / text encoders compute missing entries);
    ``dataset``: a :class:`..data.captions.CaptionedImageDataset` (center crop, no flips: the pixels are fixed).
    """

    def __init__(self, task, dataset, root: str):
        c = task.config
        self.task, self.dataset = task, dataset
        dtype = str(c.resolved_weight_dtype()).replace("torch.", "")
        vae_source = c.vae or c.pretrained
        vae_key = {
            "vae": _model_key(vae_source, None if c.vae else c.revision, [""] if c.vae else ["vae"]),
            "resolution": c.resolution, "center_crop": c.center_crop, "dtype": dtype, "content": "latent_dist",
            "buckets": [c.resolutions, c.aspect_ratios, c.upscale_small_images] if c.resolutions else None,
        }
        text_key = {
            "text_encoders": _model_key(
                c.pretrained, c.revision, ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
            ),
            "max_sequence_length": c.max_sequence_length, "dtype": dtype,
        }
        self.latent_dir = _cache_folder(root, "latents", vae_key)
        self.text_dir = _cache_folder(root, "text", text_key)
        self.image_keys = dataset.image_keys()

    # ------------------------------------------------------------------------------------------ paths
    def latent_path(self, index: int) -> str:
        return os.path.join(self.latent_dir, _digest(self.image_keys[index]) + ".safetensors")

    def text_path(self, caption: str) -> str:
        return os.path.join(self.text_dir, _digest(caption) + ".safetensors")

    def captions(self) -> list[str]:
        """Every caption the training and validation can ask for: the data's, the empty prompt, the validation ones."""
        found = {""}
        for i in range(len(self.dataset)):
            found.update(self.dataset.caption_choices(i))
        found.update(self.task.config.validation_prompts or ["a photo"])
        return sorted(found)

    def missing(self) -> tuple[list[int], list[str]]:
        images = [i for i in range(len(self.dataset)) if not os.path.isfile(self.latent_path(i))]
        captions = [c for c in self.captions() if not os.path.isfile(self.text_path(c))]
        return images, captions

    def is_complete(self) -> bool:
        images, captions = self.missing()
        return not images and not captions

    # ------------------------------------------------------------------------------------------ build
    @torch.no_grad()
    def build(self, device, batch_size: int = 8, show_progress: bool = True) -> dict[str, int]:
        """Compute and store the missing entries (batched). Returns how many images and captions were encoded."""
        images, captions = self.missing()
        if images:
            vae = self.task.pipe.vae.to(device)
            images = sorted(images, key=self.dataset.target_size)  # a batch holds one bucket's images
            chunks = [images[s:s + batch_size] for s in range(0, len(images), batch_size)]
            chunks = [[i for i in chunk if self.dataset.target_size(i) == size] for chunk in chunks
                      for size in sorted({self.dataset.target_size(i) for i in chunk})]
            for chunk in tqdm(chunks, desc="cache latents", disable=not show_progress):
                pixels = torch.stack([self.dataset[i]["pixel_values"] for i in chunk]).to(device, vae.dtype)
                params = vae.encode(pixels).latent_dist.parameters
                for i, p in zip(chunk, params):
                    _save_atomic({"latent_dist": p}, self.latent_path(i))
        if captions:
            self.task._to_device(torch.device(device), ("text_encoder", "text_encoder_2"))
            for start in tqdm(range(0, len(captions), batch_size), desc="cache text", disable=not show_progress):
                chunk = captions[start:start + batch_size]
                embeds, pooled, _ = self.task.pipe.encode_prompt(
                    prompt=chunk, prompt_2=None, device=device, max_sequence_length=self.task.config.max_sequence_length
                )
                for caption, e, p in zip(chunk, embeds, pooled):
                    _save_atomic({"prompt_embeds": e, "pooled_prompt_embeds": p}, self.text_path(caption))
        if images or captions:
            logger.info("cache: encoded %d images and %d captions (%s, %s)", len(images), len(captions),
                        self.latent_dir, self.text_dir)
        return {"images": len(images), "captions": len(captions)}

    # ------------------------------------------------------------------------------------------ read
    def text(self, caption: str) -> dict[str, torch.Tensor]:
        return load_file(self.text_path(caption))

    def text_batch(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled [B, D]) of ``captions`` from the cache."""
        loaded = [self.text(c) for c in captions]
        embeds = torch.stack([t["prompt_embeds"] for t in loaded]).to(device)
        pooled = torch.stack([t["pooled_prompt_embeds"] for t in loaded]).to(device)
        return embeds, pooled


class CachedCaptionedImages(torch.utils.data.Dataset):
    """The training items of a complete :class:`FluxEmbeddingCache`: ``latent_dist`` [2C, h, w] (the VAE posterior's
    parameters), ``prompt_embeds`` [L, D], ``pooled_prompt_embeds`` [D] and the ``captions`` string (a list cell's
    caption picked at random per access, as the uncached data set does)."""

    def __init__(self, cache: FluxEmbeddingCache):
        self.cache = cache
        self.bad_samples = cache.dataset.bad_samples
        self.sizes = cache.dataset.sizes  # aspect buckets, for the loop's batching

    def __len__(self) -> int:
        return len(self.cache.dataset)

    def __getitem__(self, index: int) -> dict:
        import random

        caption = random.choice(self.cache.dataset.caption_choices(index))
        item = {"latent_dist": load_file(self.cache.latent_path(index))["latent_dist"], "captions": caption}
        item.update(self.cache.text(caption))
        return item
