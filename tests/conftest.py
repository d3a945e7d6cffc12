"""Shared pytest setup for tests/."""

import os

import pytest
import torch

# tests/triton runs Triton kernels, which on a machine without a GPU need TRITON_INTERPRET=1 set before triton
# is first imported: `make test-triton` runs that directory in a process of its own. A plain `pytest tests`
# leaves it out unless the interpreter is already on or a GPU is present.
collect_ignore = []

# Inductor's compiled-code cache is keyed without ATEN_CPU_CAPABILITY: a kernel generated under AVX-512 and
# replayed in a run under ATEN_CPU_CAPABILITY=default fails to compile ("'at::vec' has not been declared"), and CI
# runs the number-comparing tests a second time under that setting. One cache per capability.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{capability}")
if os.environ.get("TRITON_INTERPRET", "") != "1" and not torch.cuda.is_available():
    collect_ignore.append("triton")


@pytest.fixture(autouse=True)
def _seed():
    # Each test draws its inputs from a fixed seed, so a failure reproduces when the test runs alone.
    torch.manual_seed(0)
