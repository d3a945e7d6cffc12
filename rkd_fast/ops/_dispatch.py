"""What every op shares: argument checks that raise clear Python errors, the choice of backend, and the backward of
a fused op (a gradient computed in the forward, scaled by the upstream gradient)."""

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _extension
from ..checks import check_choice  # noqa: F401  (the ops import it from here)

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
REDUCTION_IDS = {name: i for i, name in enumerate(REDUCTIONS)}  # the kernels' `reduction` argument


def is_number(value):
    """A Python int or float, not a bool (True would pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


FLOAT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


def check_float_tensor(name, value):
    if isinstance(value, torch.Tensor) and value.dtype in FLOAT_DTYPES:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {value.dtype}")
    raise TypeError(f"{name} has unsupported dtype {value.dtype}")


def check_same_device(**tensors):
    devices = [t.device for t in tensors.values() if t is not None]
    if any(device != devices[0] for device in devices):
        listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
        raise ValueError(f"inputs must be on the same device, got {listing}")


_REGISTERED = {}  # (op_name, dispatch_key) -> bool, asked once: the library is loaded before the first question


@torch.compiler.assume_constant_result  # a fact about the loaded library: torch.compile reads it at trace time
def _kernel_registered(op_name, dispatch_key):
    # An extension built before an op's kernels existed loads fine but has no kernel for it: the op would fail
    # with NotImplementedError, so the backend counts as unavailable.
    key = (op_name, dispatch_key)
    if key not in _REGISTERED:
        try:
            _REGISTERED[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"rkd_fast::{op_name}_fwd", dispatch_key)
        except RuntimeError:  # the op's schema is not defined
            _REGISTERED[key] = False
    return _REGISTERED[key]


def _gpu_verified(op_name, backend):
    return backend in _extension.GPU_VERIFIED.get(op_name, ())


def backend_status(op_name, backend, device_type):
    """None when `backend` can run `op_name` on `device_type`, otherwise the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got {device_type} tensors"
        _extension.load_extension()
        if not _extension.extension_loaded():
            return _extension.extension_reason()
        if not _kernel_registered(op_name, "CPU"):
            return "the loaded extension has no CPU kernel for this op; rebuild it"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got {device_type} tensors"
        _extension.load_extension()
        if not _extension.extension_loaded():
            return _extension.extension_reason()
        if not _extension.extension_has_cuda():
            return "extension built without CUDA kernels"
        if not _kernel_registered(op_name, "CUDA"):
            return "the loaded extension has no CUDA kernel for this op; rebuild it"
        return None
    if backend == "triton":
        ok, reason = _extension.triton_available()
        if not ok:
            return reason
        if device_type == "cpu" and not _triton_interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run {device_type} tensors"
        return None
    return f"unknown backend {backend!r}"


def _triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def auto_backend(op_name, device_type):
    """(backend, why) that `backend="auto"` uses on this device type."""
    if device_type == "cpu":
        reason = backend_status(op_name, "cpu", "cpu")
        if reason is None:
            return "cpu", "C++ kernel (fastest on CPU, see docs/benchmarks.md)"
        return "reference", f"C++ kernel unavailable: {reason}"
    if device_type == "cuda":
        for backend in ("cuda", "triton"):
            if _gpu_verified(op_name, backend) and backend_status(op_name, backend, "cuda") is None:
                return backend, f"{backend} kernel verified on a GPU"
        return "reference", "no GPU kernel of this op has passed the GPU tests on a real GPU yet"
    return "reference", f"no fused kernel for {device_type} tensors"


def choose_backend(op_name, backend, device):
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return auto_backend(op_name, device.type)[0]
    reason = backend_status(op_name, backend, device.type)
    if reason is not None:
        raise RuntimeError(f"{op_name}: backend {backend!r} is unavailable: {reason}")
    return backend


def scale_by_upstream(upstream, *grads):
    """The gradients `grads` (None where not needed), computed in the forward for an upstream gradient of one,
    times the actual upstream gradient (0-d, or one value per index of each gradient's dim 0). Nothing is done for
    an upstream gradient of exactly one, an unweighted loss, where that can be read for free: a plain CPU tensor
    outside any tracing. A GPU tensor would make the host wait for the device, and a traced one (torch.compile,
    opcheck, a dispatch mode) has no value to read, so there the product is always taken."""
    readable = (type(upstream) is torch.Tensor and upstream.is_cpu and not torch.compiler.is_compiling()
                and _get_current_dispatch_mode() is None)
    if readable and (upstream.item() == 1 if upstream.dim() == 0 else bool(upstream.eq(1).all())):
        return grads

    def scaled(grad):
        factor = upstream.to(grad.dtype)
        return grad * (factor if factor.dim() == 0 else factor.view(-1, *([1] * (grad.dim() - 1))))

    return tuple(None if grad is None else scaled(grad) for grad in grads)
