# Vendored from https://github.com/huggingface/diffusers, file tests/models/testing_utils/lora.py,
# commit d035dcd7cc7c88e0a154609b62887d50bba9fdc2 (tag v0.40.0). Copyright 2025 HuggingFace Inc., Apache License 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changed for dfm-diffusers: only `check_if_lora_correctly_set` (used by the pipeline LoRA tester mixin) is kept,
# unchanged; the model-level LoRA tester mixins of that file are not vendored.
from diffusers.utils.import_utils import is_peft_available


if is_peft_available():
    from peft.tuners.tuners_utils import BaseTunerLayer


def check_if_lora_correctly_set(model) -> bool:
    """
    Check if LoRA layers are correctly set in the model.

    Args:
        model: The model to check

    Returns:
        bool: True if LoRA is correctly set, False otherwise
    """

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return True
    return False
