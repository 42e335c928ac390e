"""Loading and saving helpers of the DFM models: a strict ``from_pretrained`` (a checkpoint whose config.json does not
match its weights -- missing, unexpected or differently shaped parameters -- is one ValueError naming the folder,
never a model with parameters left on the meta device, randomly initialised, or silently dropped) and self-contained
saving."""

from __future__ import annotations

import os

from diffusers import ModelMixin

from ..remote_code import running_as_library, self_contained_signature, write_self_contained_model


class SelfContainedModelMixin:
    """``save_pretrained(..., self_contained=True)`` writes the model's code next to its weights with an ``auto_map``
    in config.json, so that plain diffusers loads it with ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
    (:mod:`dfm_diffusers.remote_code`); loading drops ``auto_map``, which is not a config attribute of the model."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)

    def save_pretrained(self, save_directory, *args, self_contained: bool | None = None, **kwargs):
        """ModelMixin.save_pretrained; ``self_contained`` (default: only when this model was itself loaded as remote
        code) also writes the code, see the class docstring."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self_contained is None:
            self_contained = not running_as_library()
        if self_contained:
            write_self_contained_model(self, os.fspath(save_directory))


# diffusers passes safe_serialization / variant / ... to a component's save_pretrained only if its signature names them
SelfContainedModelMixin.save_pretrained.__signature__ = self_contained_signature(ModelMixin.save_pretrained)


def strict_from_pretrained(cls, load, pretrained_model_name_or_path, kwargs: dict, hint: str = ""):
    """``load(path, output_loading_info=True, **kwargs)`` (ModelMixin.from_pretrained) with the checks above.

    Returns the model, or (model, loading_info) if ``kwargs`` asks for ``output_loading_info``."""
    output_loading_info = kwargs.pop("output_loading_info", False)
    where = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
    hint = f" {hint}" if hint else ""
    try:
        model, info = load(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
    except ValueError as err:
        if "expected shape" not in str(err):
            raise
        detail = str(err).split(". If you want")[0].replace("Cannot load  because ", "")
        raise ValueError(
            f"{where}: its config.json does not match its weights ({detail}); the folder was edited or mixed from "
            f"different models: save it again with save_pretrained.{hint}"
        ) from err
    missing = list(info.get("missing_keys", []))
    missing += [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing e.g. {sorted(set(missing))[:4]}")
        if unexpected:
            parts.append(f"unexpected e.g. {sorted(set(unexpected))[:4]}")
        if mismatched:
            parts.append(f"differently shaped e.g. {[m[0] for m in mismatched][:4]}")
        raise ValueError(
            f"{where} does not hold every {cls.__name__} parameter, or holds others: its config.json does not match "
            f"its weights ({'; '.join(parts)}).{hint}"
        )
    return (model, info) if output_loading_info else model


def model_from_state_dict(cls, config, state_dict: dict, what: str = "state dict"):
    """``cls.from_config(config)`` built on the meta device and assigned ``state_dict``'s tensors (strict; no random
    initialisation, no copy), in eval mode. RuntimeError if anything is left on the meta device."""
    import torch

    with torch.device("meta"):
        model = cls.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the {what} left {left[:4]} on the meta device")
    return model.eval()
