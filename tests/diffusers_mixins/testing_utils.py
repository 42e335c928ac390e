# Vendored from https://github.com/huggingface/diffusers, file tests/testing_utils.py,
# commit d035dcd7cc7c88e0a154609b62887d50bba9fdc2 (tag v0.40.0). Copyright The HuggingFace Team, Apache License 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changed for dfm-diffusers: only the helpers the vendored pipeline tester mixins import are kept (copied unchanged,
# in upstream order); the device selection keeps upstream's logic minus the Neuron / custom-backend branches; the
# empty-cache dispatch table keeps its cuda / xpu / cpu / mps entries. Nothing else is changed.
import importlib
import importlib.metadata
import logging
import os
from io import StringIO
from typing import Callable

import pytest
from packaging import version

from diffusers.utils.constants import USE_PEFT_BACKEND
from diffusers.utils.import_utils import (
    is_accelerate_available,
    is_peft_available,
    is_torch_available,
    is_transformers_available,
)


if is_torch_available():
    import torch

    if "DIFFUSERS_TEST_DEVICE" in os.environ:
        torch_device = os.environ["DIFFUSERS_TEST_DEVICE"]
        try:
            # try creating device to see if provided device is valid
            _ = torch.device(torch_device)
        except RuntimeError as e:
            raise RuntimeError(
                f"Unknown testing device specified by environment variable `DIFFUSERS_TEST_DEVICE`: {torch_device}"
            ) from e
    else:
        if torch.cuda.is_available():
            torch_device = "cuda"
        elif torch.xpu.is_available():
            torch_device = "xpu"
        else:
            torch_device = "cpu"
        mps_backend_registered = hasattr(torch.backends, "mps")
        torch_device = "mps" if (mps_backend_registered and torch.backends.mps.is_available()) else torch_device

    # Function definitions
    BACKEND_EMPTY_CACHE = {
        "cuda": torch.cuda.empty_cache,
        "xpu": torch.xpu.empty_cache,
        "cpu": None,
        "mps": torch.mps.empty_cache,
        "default": None,
    }


def assert_tensors_close(
    actual: "torch.Tensor",
    expected: "torch.Tensor",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    msg: str = "",
) -> None:
    """
    Assert that two tensors are close within tolerance.

    Uses the same formula as torch.allclose: |actual - expected| <= atol + rtol * |expected| Provides concise,
    actionable error messages without dumping full tensors.

    Args:
        actual: The actual tensor from the computation.
        expected: The expected tensor to compare against.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        msg: Optional message prefix for the assertion error.

    Raises:
        AssertionError: If tensors have different shapes or values exceed tolerance.

    Example:
        >>> assert_tensors_close(output, expected_output, atol=1e-5, rtol=1e-5, msg="Forward pass")
    """
    if not is_torch_available():
        raise ValueError("PyTorch needs to be installed to use this function.")

    # Some models (e.g. Z-Image, Cosmos ControlNet) return a list/tuple of tensors as their output. Compare these
    # element-wise so the same helper works regardless of whether the output is a single tensor or a sequence.
    if isinstance(actual, (list, tuple)) or isinstance(expected, (list, tuple)):
        if not (isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple))):
            raise AssertionError(f"{msg} Type mismatch: actual {type(actual)} vs expected {type(expected)}")
        if len(actual) != len(expected):
            raise AssertionError(f"{msg} Length mismatch: actual {len(actual)} vs expected {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_tensors_close(a, e, atol=atol, rtol=rtol, msg=f"{msg} [element {i}]")
        return

    if actual.shape != expected.shape:
        raise AssertionError(f"{msg} Shape mismatch: actual {actual.shape} vs expected {expected.shape}")

    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        abs_diff = (actual - expected).abs()
        max_diff = abs_diff.max().item()

        flat_idx = abs_diff.argmax().item()
        max_idx = tuple(idx.item() for idx in torch.unravel_index(torch.tensor(flat_idx), actual.shape))

        threshold = atol + rtol * expected.abs()
        mismatched = (abs_diff > threshold).sum().item()
        total = actual.numel()

        raise AssertionError(
            f"{msg}\n"
            f"Tensors not close! Mismatched elements: {mismatched}/{total} ({100 * mismatched / total:.1f}%)\n"
            f"  Max diff: {max_diff:.6e} at index {max_idx}\n"
            f"  Actual:   {actual.flatten()[flat_idx].item():.6e}\n"
            f"  Expected: {expected.flatten()[flat_idx].item():.6e}\n"
            f"  atol: {atol:.6e}, rtol: {rtol:.6e}"
        )



def check_if_dicts_are_equal(dict1, dict2):
    dict1, dict2 = dict1.copy(), dict2.copy()

    for key, value in dict1.items():
        if isinstance(value, set):
            dict1[key] = sorted(value)
    for key, value in dict2.items():
        if isinstance(value, set):
            dict2[key] = sorted(value)

    for key in dict1:
        if key not in dict2:
            return False
        if dict1[key] != dict2[key]:
            return False

    for key in dict2:
        if key not in dict1:
            return False

    return True



def is_lora(test_case):
    """
    Decorator marking a test as a LoRA test. These tests can be filtered using:
        pytest -m "not lora" to skip pytest -m lora to run only these tests
    """
    return pytest.mark.lora(test_case)



def is_memory(test_case):
    """
    Decorator marking a test as a memory optimization test. These tests can be filtered using:
        pytest -m "not memory" to skip pytest -m memory to run only these tests
    """
    return pytest.mark.memory(test_case)



def is_cpu_offload(test_case):
    """
    Decorator marking a test as a CPU offload test. These tests can be filtered using:
        pytest -m "not cpu_offload" to skip pytest -m cpu_offload to run only these tests
    """
    return pytest.mark.cpu_offload(test_case)



def is_group_offload(test_case):
    """
    Decorator marking a test as a group offload test. These tests can be filtered using:
        pytest -m "not group_offload" to skip pytest -m group_offload to run only these tests
    """
    return pytest.mark.group_offload(test_case)



def is_cache(test_case):
    """
    Decorator marking a test as a cache test. These tests can be filtered using:
        pytest -m "not cache" to skip pytest -m cache to run only these tests
    """
    return pytest.mark.cache(test_case)



# These decorators are for accelerator-specific behaviours that are not GPU-specific
def require_torch_accelerator(test_case):
    """Decorator marking a test that requires an accelerator backend and PyTorch."""
    return pytest.mark.skipif(torch_device == "cpu", reason="test requires accelerator+PyTorch")(test_case)



def require_accelerator(test_case):
    """
    Decorator marking a test that requires a hardware accelerator backend. These tests are skipped when there are no
    hardware accelerator available.
    """
    return pytest.mark.skipif(torch_device == "cpu", reason="test requires a hardware accelerator")(test_case)



def require_peft_backend(test_case):
    """
    Decorator marking a test that requires PEFT backend, this would require some specific versions of PEFT and
    transformers.
    """
    return pytest.mark.skipif(not USE_PEFT_BACKEND, reason="test requires PEFT backend")(test_case)



def require_peft_version_greater(peft_version):
    """
    Decorator marking a test that requires PEFT backend with a specific version, this would require some specific
    versions of PEFT and transformers.
    """

    def decorator(test_case):
        correct_peft_version = is_peft_available() and version.parse(
            version.parse(importlib.metadata.version("peft")).base_version
        ) > version.parse(peft_version)
        return pytest.mark.skipif(
            not correct_peft_version, reason=f"test requires PEFT backend with the version greater than {peft_version}"
        )(test_case)

    return decorator



def require_transformers_version_greater(transformers_version):
    """
    Decorator marking a test that requires transformers with a specific version, this would require some specific
    versions of PEFT and transformers.
    """

    def decorator(test_case):
        correct_transformers_version = is_transformers_available() and version.parse(
            version.parse(importlib.metadata.version("transformers")).base_version
        ) > version.parse(transformers_version)
        return pytest.mark.skipif(
            not correct_transformers_version,
            reason=f"test requires transformers with the version greater than {transformers_version}",
        )(test_case)

    return decorator



def require_accelerate_version_greater(accelerate_version):
    def decorator(test_case):
        correct_accelerate_version = is_accelerate_available() and version.parse(
            version.parse(importlib.metadata.version("accelerate")).base_version
        ) > version.parse(accelerate_version)
        return pytest.mark.skipif(
            not correct_accelerate_version,
            reason=f"Test requires accelerate with the version greater than {accelerate_version}.",
        )(test_case)

    return decorator



class CaptureLogger:
    """
    Args:
    Context manager to capture `logging` streams
        logger: 'logging` logger object
    Returns:
        The captured output is available via `self.out`
    Example:
    ```python
    >>> from diffusers import logging
    >>> from diffusers.utils.testing_utils import CaptureLogger

    >>> msg = "Testing 1, 2, 3"
    >>> logging.set_verbosity_info()
    >>> logger = logging.get_logger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.py")
    >>> with CaptureLogger(logger) as cl:
    ...     logger.info(msg)
    >>> assert cl.out, msg + "\n"
    ```
    """

    def __init__(self, logger):
        self.logger = logger
        self.io = StringIO()
        self.sh = logging.StreamHandler(self.io)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.sh)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.sh)
        self.out = self.io.getvalue()

    def __repr__(self):
        return f"captured: {self.out}\n"



# This dispatches a defined function according to the accelerator from the function definitions.
def _device_agnostic_dispatch(device: str, dispatch_table: dict[str, Callable], *args, **kwargs):
    fn = dispatch_table[device] if device in dispatch_table else dispatch_table["default"]

    # Some device agnostic functions return values. Need to guard against 'None' instead at
    # user level
    if not callable(fn):
        return fn

    return fn(*args, **kwargs)



def backend_empty_cache(device: str):
    return _device_agnostic_dispatch(device, BACKEND_EMPTY_CACHE)
