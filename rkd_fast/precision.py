"""Where and in what precision a computation runs, for every part of rkd_fast (training, evaluation, the attacks,
the benchmarks): the device a name means, the autocast dtype a precision means on it, and the context the forward
passes run in."""

import contextlib
import functools

import torch

from .checks import check_choice

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name → autocast dtype (None: off)


def resolve_device(name):
    """The torch.device `name` means ("auto": CUDA when available, else the CPU); ValueError when it is not one
    or not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked, but no CUDA device is available")
    return device


def resolve_precision(precision, device):
    """Training: the autocast dtype of `precision` on `device` (None for fp32), or a ValueError when the device
    cannot train so (fp16 is loss-scaled training, CUDA only)."""
    check_choice("precision", precision, tuple(PRECISIONS))
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device (loss-scaled float16 training); on {device.type} "
                             "use 'bf16' or 'fp32'")
        return torch.float16
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"precision 'bf16': {torch.cuda.get_device_name(device)} has no native bfloat16; "
                             "use 'fp16' or 'fp32'")
    elif device.type != "cpu":
        raise ValueError(f"precision 'bf16' is not supported on {device.type}; use 'fp32'")
    return torch.bfloat16


@functools.lru_cache(maxsize=None)
def _autocast_works(device_type, dtype):
    """Whether autocast to `dtype` runs a matmul on `device_type` (probed once per pair)."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return False
    try:
        with torch.autocast(device_type, dtype=dtype):
            a = torch.ones(2, 2, device=device_type)
            return (a @ a).dtype == dtype
    except (RuntimeError, ValueError, AssertionError):
        return False


def autocast_dtype(precision, device):
    """Inference and attacks: the autocast dtype for `precision` ("fp32" → None), or a clear error when `device`
    cannot run it."""
    check_choice("precision", precision, tuple(PRECISIONS))
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        raise ValueError(f"precision={precision!r}: this CUDA device has no native bfloat16; use 'fp16' or 'fp32'")
    if not _autocast_works(device.type, dtype):
        raise ValueError(f"precision={precision!r} is not supported on {device.type} (autocast to {dtype} "
                         f"is unavailable there); use 'fp32'")
    return dtype


def autocast_factory(device, dtype):
    """A zero-argument factory of the context the forward passes run in: autocast to `dtype` on `device`'s type,
    or no autocast when dtype is None (fp32). The one way the trainer, the methods and the bench build it."""
    if dtype is None:
        return contextlib.nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)
