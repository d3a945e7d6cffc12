"""Setup for the Triton kernel tests: the ops' test modules run over the Triton kernel on CPU tensors.

On a machine without a GPU the kernels run under the Triton interpreter, which has to be switched on before
triton is first imported: this conftest sets TRITON_INTERPRET=1 when it is imported, and the Makefile's
test-triton target runs this directory in a process of its own. Without triton installed every test here is
skipped with the reason.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TRITON_MISSING = importlib.util.find_spec("triton") is None


def pytest_collection_modifyitems(config, items):
    if not TRITON_MISSING:
        return
    skip = pytest.mark.skip(reason="triton is not installed (pip install triton, or rkd_fast[triton])")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(here + os.sep):
            item.add_marker(skip)

