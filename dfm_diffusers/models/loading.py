"""Strict ``from_pretrained`` for the DFM models: a checkpoint whose config.json does not match its weights (missing,
unexpected or differently shaped parameters) is one ValueError naming the folder, never a model with parameters
left on the meta device, randomly initialised, or silently dropped."""

from __future__ import annotations

import os


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
