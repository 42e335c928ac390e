"""The export of a FLUX-DFM finetune: a small LoRA export or a whole DFMPipeline folder, its model card, and the
push to the Hub (:class:`FluxExportMixin`, a part of :class:`.flux_task.FluxTask`)."""

from __future__ import annotations

import logging
import os

from ..pipelines.lora_export import LORA_WEIGHT_NAME
from .flux_config import _read_json

logger = logging.getLogger(__name__)


class FluxExportMixin:
    """``export_fn`` of :class:`.flux_task.FluxTask` and what it writes (the exported transformer, the model card).
    Uses the task's ``config``, ``pipe``, ``transformer``, ``weight_dtype``, ``pipeline()``, ``last_sample`` and
    ``last_step``."""

    def export_transformer(self, model, fuse_lora: bool = False):
        """A plain DFMTransformer2DModel (no peft layers) in ``weight_dtype`` on the CPU, built from ``model``'s
        weights: the LoRA is left out, or merged into the base weights with ``fuse_lora``. ``model`` is untouched."""
        from ..models.transformer_dfm_flux import DFMTransformer2DModel

        state = {}
        deltas = {}
        if fuse_lora:
            from peft.tuners.lora import LoraLayer

            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    deltas[f"{name}.weight"] = module.get_delta_weight("default").detach()
        for key, tensor in model.state_dict().items():
            if ".lora_" in key or "lora_magnitude" in key:
                continue
            key = key.replace(".base_layer.", ".")
            value = tensor.detach()
            if key in deltas:
                value = value.float() + deltas[key].float()
            state[key] = value.to("cpu", self.weight_dtype, copy=True)
        from ..models.loading import model_from_state_dict

        return model_from_state_dict(DFMTransformer2DModel, model.config, state, "exported transformer")

    def recommended_sampling(self) -> dict:
        """The sampling settings the exported model card recommends (the validation ones: by default the paper's
        true_cfg_scale 3.0 with guidance_scale 1.0, the value the guidance input was trained with)."""
        settings = {"true_cfg_scale": float(self.config.validation_true_cfg_scale)}
        if self.transformer.config.guidance_embeds:
            settings["guidance_scale"] = float(self.config.validation_guidance_scale)
        return settings

    def base_reference(self) -> dict:
        """The base model a LoRA export points at: its Hub id (``base_model_id`` or ``pretrained``), the local
        folder it was loaded from, revision, kind (a FluxPipeline converted here, or a DFMPipeline), ``--vae``."""
        c = self.config
        local = os.path.isdir(c.pretrained)
        from ..pipelines.hub import pipeline_class_name

        index = _read_json(c.pretrained, "model_index.json", c.revision)
        kind = "flux" if pipeline_class_name(index) == "FluxPipeline" else "dfm"
        return {
            "base_model": c.base_model_id or (os.path.abspath(c.pretrained) if local else c.pretrained),
            "base_model_path": os.path.abspath(c.pretrained) if local else None,
            "revision": c.revision, "base_kind": kind,
            "vae": (os.path.abspath(c.vae) if os.path.isdir(c.vae) else c.vae) if getattr(c, "vae", None) else None,
        }

    def license(self) -> str:
        """``license``, else the ``license:`` of the base folder's README.md metadata, else "other"."""
        if self.config.license:
            return self.config.license
        readme = os.path.join(self.config.pretrained, "README.md")
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                text = f.read()
            if text.startswith("---"):
                for line in text.split("---")[1].splitlines():
                    if line.strip().startswith("license:"):
                        return line.split(":", 1)[1].strip()
        return "other"

    def model_card(self, repo_id: str, pipe, lora_export: bool = False, revision: str | None = None) -> str:
        c = self.config
        base = self.base_reference()["base_model"]
        if not lora_export:
            card = pipe.model_card(repo_id, base_model=base, sampling=self.recommended_sampling(), revision=revision,
                                   self_contained=c.self_contained_export)
            card = card.replace("license: other", f"license: {self.license()}", 1)
            return card + self.training_card_section()
        sampling = self.recommended_sampling()
        call_kwargs = "".join(f", {k}={v!r}" for k, v in sampling.items())
        lines = [
            "---", "library_name: diffusers", f"license: {self.license()}", f"base_model: {base}",
            "pipeline_tag: text-to-image", "tags:", "- lora", "- decomposable-flow-matching", "- dfm",
            "- dfm-diffusers", "---",
            f"# {repo_id.split('/')[-1]}", "",
            f"A LoRA (rank {c.lora_rank}) and the Decomposable Flow Matching (DFM, arXiv 2506.19839) stage layers "
            f"trained on top of `{base}`. This repo holds only what was trained: `{LORA_WEIGHT_NAME}` (the LoRA), "
            f"the stage layers and `dfm_lora_config.json` (the base model and the DFM settings); the base weights "
            f"come from the base model.", "",
            "## DFM settings", "", f"- base model: `{base}`", *pipe.dfm_settings_lines(), "",
            "## Recommended sampling settings", "", *[f"- `{k}={v!r}`" for k, v in sampling.items()], "",
            "## How to load", "", "```python", "import torch", "from dfm_diffusers import DFMPipeline", "",
            "# converts the base if it is a plain FLUX pipeline, then loads the stage layers and the LoRA",
            f'pipe = DFMPipeline.from_lora_export("{repo_id}", dtype=torch.bfloat16)',
            "# or, with the base already converted: DFMPipeline.from_pretrained(converted).load_dfm_lora(repo)",
            f'image = pipe("a photo of a cat"{call_kwargs}).images[0]', "```", "",
        ]
        return "\n".join(lines) + self.training_card_section()

    def training_card_section(self) -> str:
        c = self.config
        lines = [
            "## Training", "",
            f"- data: `{c.dataset}`" + (f" (split {c.split})" if c.split != "train" else ""),
            f"- resolution: {c.resolution}px, batch size {c.train_batch_size}, learning rate {c.learning_rate}",
            f"- steps: {self.last_step if self.last_step is not None else c.max_train_steps}",
            f"- mode: {'LoRA rank %d' % c.lora_rank if c.lora else 'full finetune'}"
            + (f" on a {c.quantize_base}-quantized base (QLoRA)" if c.quantize_base else "")
            + f", caption dropout {c.caption_dropout}",
            "",
        ]
        if self.last_sample:
            lines += ["## Samples", "", "Columns: validation prompts " + str(c.validation_prompts or ["a photo"])
                      + "; rows: the stage previews, coarse to fine (the last row is the final image).", "",
                      "![validation samples](samples.png)", ""]
        return "\n".join(lines)

    def export_fn(self, model, folder: str):
        """Write the export + README.md (the model card, with the latest validation grid as samples.png).

        LoRA (default): only what was trained (:func:`..pipelines.lora_export.save_lora_export`: the LoRA, the stage
        layers and a JSON naming the base); load it with ``DFMPipeline.from_lora_export(folder)``. Full finetune, or
        LoRA with ``fuse_lora_on_export``: a whole DFMPipeline folder (LoRA merged in). Then pushed when
        ``push_to_hub``.
        """
        import shutil

        c = self.config
        small = c.lora and not c.fuse_lora_on_export
        if small:
            from peft.utils import get_peft_model_state_dict

            from ..pipelines.lora_export import save_lora_export

            pipe = self.pipeline(model)
            save_lora_export(
                folder, model, self.pipe.scheduler, self.base_reference(),
                lora_layers=get_peft_model_state_dict(model), lora_metadata=model.peft_config["default"].to_dict(),
            )
        else:
            pipe = self.pipeline(self.export_transformer(model, fuse_lora=c.lora))
            pipe.save_pretrained(folder, self_contained=c.self_contained_export)
        if self.last_sample and os.path.isfile(self.last_sample):
            shutil.copyfile(self.last_sample, os.path.join(folder, "samples.png"))
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:  # loading code points at the folder
            f.write(self.model_card(os.path.abspath(folder), pipe, lora_export=small))
        if c.push_to_hub:
            from huggingface_hub import HfApi

            from ..pipelines.hub import upload_with_model_card

            api = HfApi()
            name = c.hub_model_id or os.path.basename(os.path.abspath(c.output_dir))
            repo_id = api.create_repo(name, exist_ok=True).repo_id
            what = "DFM LoRA export" if small else "DFMPipeline"
            upload_with_model_card(
                api, repo_id, folder, f"Upload {what} (train_dfm_flux)", False,
                lambda revision: self.model_card(repo_id, pipe, lora_export=small, revision=revision),
            )
            logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
