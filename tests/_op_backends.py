"""Which backends of an op the CPU tests can run here: parameters that skip, with the reason
`rkd_fast.backends()` gives, where a backend is unavailable."""

import pytest

import rkd_fast


def backend_params(op):
    """(status, [reference, cpu] as pytest params, the skip mark for tests that need the cpu kernel)."""
    status = rkd_fast.backends()[op]

    def param(name):
        return pytest.param(name, marks=pytest.mark.skipif(status[name] != "available",
                                                           reason=f"backend {name!r} {status[name]}"))

    needs_cpu = pytest.mark.skipif(status["cpu"] != "available", reason=f"backend 'cpu' {status['cpu']}")
    return status, [param("reference"), param("cpu")], needs_cpu
