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

# _digits_model imports rkd_fast: after the cache is chosen
from _digits_model import digits_batch, one_thread, robust_digits_model, save_teacher  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # Each test draws its inputs from a fixed seed, so a failure reproduces when the test runs alone.
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """The training tests' teacher: an untrained small_cnn of width 4 (seed 1) in a model file."""
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture
def tiny_batch():
    """6 random digits-sized images in [0, 1] and their labels, from the seeded global RNG."""
    return digits_batch(6)


@pytest.fixture
def single_thread():
    """One torch thread for the test (the attack and evaluation tests' small models run fastest so)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def robust_model():
    """The attack and evaluation tests' model: small_cnn (width 16) after 12 epochs of PGD-AT on digits."""
    return robust_digits_model()


@pytest.fixture(scope="session")
def digits_test():
    """Digits' test split, (x, y)."""
    from rkd_fast.datasets import load_digits
    return load_digits("test")
