"""The bad arguments every feature_distance kernel refuses when called directly, past the Python API's checks:
the C++ CPU and CUDA kernels (csrc/input_checks.cpp, tests/test_feature_distance.py) and the Triton kernel
(tests/triton/test_feature_distance_triton.py) keep one contract: the same exception types, the same words."""

import math

import torch


def forward_cases(a):
    """(arguments of the op (student, teacher, mode, p, reduction, grad_student, grad_teacher), exception type,
    message pattern) built from `a`, a (2, 3, 4, 5) float32 tensor on the kernel's device."""
    cases = [
        ((a, a.contiguous(memory_format=torch.channels_last), 0, 2.0), ValueError,
         "both contiguous or both channels_last"),
        ((a, a, 3, 2.0), ValueError, "mode must be"),
        ((a, a.double(), 1, 2.0), TypeError, "dtypes differ"),
        ((a.int(), a.int(), 1, 2.0), TypeError, r"unsupported dtype (Int|torch\.int32)"),  # c10's and torch's names
        ((a, a[:, :, :, :4], 0, 2.0), ValueError, "equal shapes"),
        ((a, a[:, :2], 0, 2.0), ValueError, "equal shapes"),
        ((a, a[:1], 0, 2.0), ValueError, "same batch size"),
        ((a[..., ::2], a[..., ::2].contiguous(), 2, 2.0), ValueError, "contiguous or channels_last"),
        ((a[0, 0], a[0, 0], 2, 2.0), ValueError, "4-D"),
        ((a, a, 2, 0.0), ValueError, "p must be"),
        ((a, a, 2, math.nan), ValueError, "p must be"),
        ((a, a, 1, 2.0, 3), ValueError, "reduction must be"),
        ((a, a, 1, 2.0, -1), ValueError, "reduction must be"),
    ]
    if a.is_cuda:  # the dispatcher picks the CUDA kernel for a CPU tensor beside a CUDA one
        cases.append(((a, a.cpu(), 0, 2.0), ValueError, "student and teacher are on"))
    # reduction "mean" and both gradients unless the case says otherwise
    return [(args + (0, True, True)[len(args) - 4:], error, message) for args, error, message in cases]
