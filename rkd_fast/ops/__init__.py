"""The fused loss ops. Importing this package defines their schemas and loads the compiled kernels."""

from .. import _extension
from ._dispatch import BACKENDS, auto_backend, backend_status
from .fd_jacobian import fd_jacobian_loss
from .feature_distance import feature_distance

_extension.load_extension()

OPS = ("feature_distance", "fd_jacobian")
__all__ = ["OPS", "backends", "fd_jacobian_loss", "feature_distance"]


def backends():
    """What can serve each op here, and why not where it cannot.

    Returns ``{op: {"cpu": status, "cuda": status, "triton": status, "reference": status,
    "auto (cpu)": choice, "auto (cuda)": choice}}`` where a status is ``"available"`` or
    ``"unavailable: <reason>"`` (for the device the backend serves: CPU for "cpu", CUDA for "cuda" and
    "triton", CPU under TRITON_INTERPRET=1 when no GPU is present) and a choice is ``"<backend>: <why>"``.
    """
    import torch

    gpu = "cuda" if torch.cuda.is_available() else None
    report = {}
    for op in OPS:
        entry = {}
        for backend in BACKENDS[1:]:
            device = "cpu" if backend in ("cpu", "reference") else "cuda"
            if backend == "triton" and gpu is None and backend_status(op, "triton", "cpu") is None:
                device = "cpu"
            if device == "cuda" and gpu is None:
                entry[backend] = "unavailable: no GPU"
                if backend == "cuda" and not _extension.extension_has_cuda():
                    entry[backend] += f" ({_extension.extension_reason() or 'extension built without CUDA'})"
                continue
            reason = backend_status(op, backend, device)
            entry[backend] = "available" if reason is None else f"unavailable: {reason}"
        for device in ("cpu", "cuda"):
            choice, why = auto_backend(op, device)
            entry[f"auto ({device})"] = f"{choice}: {why}"
        report[op] = entry
    return report
