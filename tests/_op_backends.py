"""Which backends of an op the tests can run here: parameters that skip, with the reason `rkd_fast.backends()`
gives, where a backend is unavailable; and the marks of the GPU test modules."""

import pytest
import torch

import rkd_fast

# pytestmark of a module of GPU tests: marked `gpu`, skipped with the reason on a machine without one.
GPU_MODULE_MARKS = [pytest.mark.gpu,
                    pytest.mark.skipif(not torch.cuda.is_available(),
                                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]


def _params(status, names, gpu=()):
    """`names` as pytest params, each skipped with its backend's status unless available; those in `gpu` are
    also marked `gpu`."""
    return [pytest.param(name, marks=[pytest.mark.skipif(status[name] != "available",
                                                         reason=f"backend {name!r} {status[name]}"),
                                      *([pytest.mark.gpu] if name in gpu else [])])
            for name in names]


def backend_params(op):
    """(status, [reference, cpu] as pytest params, the skip mark for tests that need the cpu kernel)."""
    status = rkd_fast.backends()[op]
    needs_cpu = pytest.mark.skipif(status["cpu"] != "available", reason=f"backend 'cpu' {status['cpu']}")
    return status, _params(status, ("reference", "cpu")), needs_cpu


def gpu_backend_params(op):
    """(status, [cuda, triton] as pytest params)."""
    status = rkd_fast.backends()[op]
    return status, _params(status, ("cuda", "triton"))


def kernel_device_params(op):
    """["cpu", "cuda"] as pytest params: the devices of the op's C++/CUDA kernels (its dispatcher registrations),
    each skipped with the reason where its backend is unavailable; the cuda one is also marked `gpu`."""
    return _params(rkd_fast.backends()[op], ("cpu", "cuda"), gpu=("cuda",))
