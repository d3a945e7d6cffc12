"""The process a run trains in: its device, its mixed precision, the global seeds and the determinism flags."""

import os
import random

import numpy as np
import torch


def resolve_device(name):
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
    """The autocast dtype of `precision` on `device` (None for fp32), or a ValueError when the device cannot."""
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


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def set_determinism(deterministic, device):
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic GEMMs (read when CUDA initialises).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return saved


def restore_determinism(saved):
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic = saved[1]
    torch.backends.cudnn.benchmark = saved[2]
