"""Hub loading and pushing shared by the DFM pipelines.

diffusers' own Hub download path rejects components whose library is a pip package other than diffusers /
transformers, so ``from_pretrained`` resolves a repo id with ``huggingface_hub.snapshot_download`` first and
then loads the local folder. ``save_pretrained(..., self_contained=True)`` also writes the library's code into the
folder (:mod:`dfm_diffusers.remote_code`), so plain diffusers loads it with ``trust_remote_code=True``; the library loads such
folders with its own installed classes. ``push_to_hub`` saves the pipeline (self-contained by default), uploads it,
then writes a model card whose snippets pin the uploaded revision.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, snapshot_download

from ..remote_code import library_model_index, running_as_library, self_contained_signature, write_self_contained

_SNAPSHOT_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file cannot be loaded (truncated, bad header), from its header alone; None if it is whole."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        return f"not a readable safetensors file ({size} bytes; {type(err).__name__}: {err})"
    if 8 + header_len + end != size:
        return f"truncated or padded: {size} bytes, but its header describes {8 + header_len + end}"
    return None


def pipeline_class_name(index: dict) -> str | None:
    """The pipeline class a model_index.json names (a self-contained folder names it as [module, class])."""
    name = index.get("_class_name")
    return name[-1] if isinstance(name, (list, tuple)) and name else name


def _pipeline_classes(cls) -> set[str]:
    names, todo = set(), [cls]
    while todo:
        c = todo.pop()
        names.add(c.__name__)
        todo.extend(c.__subclasses__())
    return names


def _wrong_class_hint(cls, folder: str, class_name) -> str:
    if class_name == "FluxPipeline":
        return (
            f"convert it first: `python -m dfm_diffusers.convert --flux {folder} --output DFM_FOLDER` (or "
            f"DFMPipeline.from_flux_pipeline(FluxPipeline.from_pretrained(...)) in Python), then load DFM_FOLDER"
        )
    if class_name in ("DFMPipeline", "DFMDiTPipeline"):
        return f"load it with {class_name}.from_pretrained"
    return f"load it with its own pipeline class, or convert it to a {cls.__name__}"


def looks_like_a_path(name: str) -> bool:
    """True for names that cannot be Hub repo ids ("name" or "owner/name") and so mean a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def download_pipeline(name: str, **snapshot_kwargs) -> str:
    """The local folder of ``name``: a Hub repo id downloaded with snapshot_download. ValueError saying "folder not
    found" for what can only be a local path, and naming both readings when the repo cannot be had either."""
    if os.path.exists(name):
        raise ValueError(f"{name} is a file, not a pipeline folder")
    if looks_like_a_path(name):
        raise ValueError(f"folder not found: {name} (a Hub repo id looks like 'owner/name')")
    try:
        return snapshot_download(name, **snapshot_kwargs)
    except Exception as err:  # HFValidationError, RepositoryNotFoundError, offline mode, no connection, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{name}: no such local folder, and it could not be loaded as a Hub repo id ({type(err).__name__}: "
            f"{reason})"
        ) from err


def check_pipeline_folder(cls, folder: str, passed: set[str] = frozenset()) -> None:
    """ValueError naming the folder or file for a pipeline folder that ``cls`` cannot load completely: no or a bad
    model_index.json, another pipeline class (a FluxPipeline needs converting), or a model component whose weight
    file is missing or truncated (components in ``passed``, given to from_pretrained, are not checked). Checked
    before anything is loaded."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        if os.path.isfile(os.path.join(folder, "dfm_lora_config.json")):
            raise ValueError(
                f"{folder} is a DFM LoRA export (the trained layers and the name of their base), not a pipeline "
                f"folder: load it with DFMPipeline.from_lora_export({folder!r})"
            )
        raise ValueError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{index_path} is not readable JSON: {err}") from err
    class_name = pipeline_class_name(index)
    if class_name not in _pipeline_classes(cls):
        raise ValueError(
            f"{folder} holds a {class_name}, not a {cls.__name__}: {_wrong_class_hint(cls, folder, class_name)}"
        )
    for name, spec in index.items():
        if name.startswith("_") or name in passed or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        sub = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(sub, "config.json")):
            continue  # schedulers, tokenizers, processors: no weights
        files = os.listdir(sub)
        shard_lists = [f for f in files if f.endswith(".safetensors.index.json")]
        weights = [os.path.join(sub, f) for f in files if f.endswith(".safetensors")]
        for listing in shard_lists:
            with open(os.path.join(sub, listing), encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            for shard in shards:
                if not os.path.isfile(os.path.join(sub, shard)):
                    raise ValueError(
                        f"{os.path.join(sub, shard)} is missing (listed in {listing}): the {name} weights are "
                        f"incomplete; download or save the pipeline again"
                    )
        if not weights and not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files):
            raise ValueError(
                f"{sub} has a config.json but no weight file (.safetensors): the {name} weights are missing; "
                f"download or save the pipeline again"
            )
        for path in sorted(weights):
            problem = safetensors_problem(path)
            if problem:
                raise ValueError(f"{path}: {problem}. The {name} weights are damaged; download or save them again")


class DFMHubMixin:
    """Mixed into DFM pipelines ahead of DiffusionPipeline."""

    model_card_kind = "generic"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a Hub repo id (downloaded with snapshot_download first)."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            snapshot_kwargs = {k: kwargs.pop(k) for k in _SNAPSHOT_KWARGS if k in kwargs}
            if "token" not in snapshot_kwargs and "use_auth_token" in kwargs:
                snapshot_kwargs["token"] = kwargs.pop("use_auth_token")
            path = download_pipeline(path, **snapshot_kwargs)
        check_pipeline_folder(cls, path, passed=set(kwargs))
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """ConfigMixin.load_config; a self-contained folder's model_index.json comes back pointing at the installed
        library (:func:`dfm_diffusers.remote_code.library_model_index`), so from_pretrained builds the library's
        classes."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        folder = str(pretrained_model_name_or_path)
        folder = os.path.dirname(folder) if folder.endswith(".json") else folder
        if isinstance(out, tuple):
            return (library_model_index(out[0], folder), *out[1:])
        return library_model_index(out, folder)

    def save_pretrained(self, save_directory, *args, self_contained: bool | None = None, **kwargs):
        """DiffusionPipeline.save_pretrained; ``self_contained=True`` also writes the code (see the module docstring)
        so that plain diffusers loads the folder with ``trust_remote_code=True``. Default: False when run from the
        installed library, True when this pipeline was itself loaded as remote code (its modules are not
        importable by name elsewhere)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self_contained is None:
            self_contained = not running_as_library()
        if self_contained:
            write_self_contained(self, str(save_directory))

    save_pretrained.__signature__ = self_contained_signature(DiffusionPipeline.save_pretrained)

    def dfm_settings_lines(self) -> list[str]:
        """Markdown list items naming the transformer's and scheduler's DFM settings (for model cards)."""
        t, s = self.transformer.config, self.scheduler.config
        thresholds = list(s.stage_thresholds)
        taus = [round(1 - x, 6) for x in thresholds]
        lines = [
            f"- transformer: `{type(self.transformer).__name__}`",
            f"- stages: {t.num_stages}, resolution factors between stages: {t.stage_factors}",
        ]
        if t.get("stage_upsampling") is not None:
            lines.append(f"- stage upsampling (carrier factors): {list(t.stage_upsampling)}")
        if t.get("stage_scales") is not None:
            lines.append(f"- stage scales: {list(t.stage_scales)}")
        return lines + [
            f"- steps per stage: {list(s.steps_per_stage)}",
            f"- stage thresholds (actual sigma after the time shift, 1 = noise): {thresholds} (paper's tau = 1 - sigma: {taus})",
            f"- time shift: {'dynamic (FLUX mu)' if s.use_dynamic_shifting else f'static shift {s.shift}'}",
        ]

    def model_card(
        self,
        repo_id: str,
        base_model: str | None = None,
        sampling: dict | None = None,
        revision: str | None = None,
        self_contained: bool = False,
    ) -> str:
        """Markdown model card (with YAML metadata) describing the DFM settings and how to load; ``sampling``: the
        recommended call settings (e.g. ``{"true_cfg_scale": 3.0, "guidance_scale": 1.0}``), listed and used in
        the examples. ``self_contained``: the repo carries its code (save_pretrained(self_contained=True)), so the card
        also shows loading it with diffusers alone, pinned to ``revision`` (the commit the code was uploaded in)."""
        pipeline_class = type(self).__name__
        meta = ["---", "library_name: diffusers", "license: other"]
        if base_model:
            meta.append(f"base_model: {base_model}")
        task = "text-to-image" if self.model_card_kind == "flux" else "unconditional-image-generation"
        meta += [f"pipeline_tag: {task}", "tags:", "- decomposable-flow-matching", "- dfm", "- dfm-diffusers", "---"]
        lines = [
            f"# {repo_id.split('/')[-1]}",
            "",
            "A Decomposable Flow Matching (DFM, arXiv 2506.19839) model: the latent is split into a Laplacian "
            "pyramid and generated coarse to fine inside one transformer, every stage with its own flow timestep.",
            "",
            "## DFM settings",
            "",
            f"- base model: {base_model or 'trained from scratch'}",
            *self.dfm_settings_lines(),
            "",
        ]
        call_kwargs = "".join(f", {k}={v!r}" for k, v in (sampling or {}).items())
        if sampling:
            lines += ["## Recommended sampling settings", ""]
            lines += [f"- `{k}={v!r}`" for k, v in sampling.items()]
            if "true_cfg_scale" in sampling and self.model_card_kind == "flux":
                lines += ["", "Without a negative prompt, true CFG guides against the empty prompt (what caption "
                          "dropout trained as the unconditional input)."]
            lines.append("")
        if self.model_card_kind == "flux":
            call = [f'out = pipe("a photo of a cat"{call_kwargs}, return_previews=True)',
                    "out.images[0].save('cat.png')  # out.previews: one low-resolution preview per stage"]
        else:
            call = [f"out = pipe(class_labels=[1, 2, 3]{call_kwargs}, return_previews=True)",
                    "out.images[0].save('sample.png')  # out.previews: one low-resolution preview per stage"]
        lines += [
            "## How to load",
            "",
            "With dfm-diffusers (`pip install dfm-diffusers`):",
            "",
            "```python",
            "import torch",
            f"from dfm_diffusers import {pipeline_class}",
            "",
            f'pipe = {pipeline_class}.from_pretrained("{repo_id}", dtype=torch.bfloat16)',
            *call,
            "```",
            "",
        ]
        if self_contained:
            pinned = f', revision="{revision}"' if revision else ""
            lines += [
                "With diffusers alone: this repository also holds the pipeline's code (the `.py` files at the root and "
                "in the component folders, copied from dfm-diffusers), which diffusers runs with "
                "`trust_remote_code=True`. Remote code runs on your machine: read it first, and pin the revision you "
                "read" + (" (the commit below is the one the code was uploaded in)." if revision else "."),
                "",
                "```python",
                "import torch",
                "from diffusers import DiffusionPipeline",
                "",
                f'pipe = DiffusionPipeline.from_pretrained("{repo_id}"{pinned}, trust_remote_code=True, '
                f"dtype=torch.bfloat16)",
                *call,
                "```",
                "",
            ]
        return "\n".join(meta + lines)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        base_model: str | None = None,
        self_contained: bool = True,
        sampling: dict | None = None,
    ) -> str:
        """Save the pipeline (self-contained unless ``self_contained=False``, see :meth:`save_pretrained`), upload it
        to ``repo_id``, then upload a model card whose diffusers-only snippet pins the uploaded commit; returns the
        repo id."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder, safe_serialization=safe_serialization, variant=variant, self_contained=self_contained
            )
            upload_with_model_card(
                api, repo_id, folder, commit_message or f"Upload {type(self).__name__}", create_pr,
                lambda revision: self.model_card(repo_id, base_model=base_model, sampling=sampling,
                                                 revision=revision, self_contained=self_contained),
            )
        return repo_id


def upload_with_model_card(api, repo_id: str, folder: str, commit_message: str, create_pr: bool, card) -> str:
    """Upload ``folder`` to ``repo_id``, then its README.md = ``card(commit)`` naming the commit just made (a card
    that pins the uploaded code cannot be part of that commit). Returns that commit's id."""
    readme = os.path.join(folder, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(card(None))
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr)
    commit = getattr(info, "oid", None)
    if commit:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(card(commit))
        api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id,
                        commit_message="Model card: pin the revision of the uploaded code",
                        revision=getattr(info, "pr_revision", None) if create_pr else None)
    return commit
