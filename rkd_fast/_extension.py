"""Loads the compiled kernels (rkd_fast._C) if they can be used, and says why not otherwise.

`import rkd_fast` never fails because of the extension: a missing build, a build against another torch
version, or a library that fails to load each leave the ops on their Triton or reference paths, with one
warning that names the reason. Set RKD_FAST_NO_EXTENSION=1 to skip loading it on purpose.
"""

import glob
import hashlib
import importlib
import importlib.util
import os
import warnings

import torch

# Backends whose GPU kernels have passed the GPU tests (`pytest -m gpu`) on a real GPU, per op. `auto` on a GPU picks a
# kernel only once its op is listed here; until then it uses the reference and `backends()` says so.
# Both ops' CUDA and Triton kernels passed on an H100 with torch 2.11 on 2026-11-25 (docs/gpu/README.md); both
# were rewritten since (single-pass feature_distance, fd_jacobian with the reduction inside) and have only been
# compiled (CUDA) and run under the Triton interpreter: none is listed until the GPU tests pass again.
GPU_VERIFIED = {}

_state = {"loaded": False, "reason": None, "with_cuda": False}

# Looked up once: the backend choice runs inside torch.compile'd code, and dynamo refuses to trace find_spec.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def sources_digest(csrc=CSRC):
    """sha256 of the kernel sources. setup.py records it at build time; in a source checkout (an editable
    install) a library built from other sources is never loaded: its kernels may not match the schemas defined
    in Python, and a mismatch found while the library registers its kernels aborts the process."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if path.endswith((".cpp", ".cu", ".h", ".cuh")):
            digest.update(os.path.relpath(path, csrc).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _load():
    if os.environ.get("RKD_FAST_NO_EXTENSION", "") == "1":
        return "disabled by RKD_FAST_NO_EXTENSION=1"
    try:
        info = importlib.import_module("rkd_fast._build_info")
    except ImportError:
        return "extension not built (run `pip install --no-build-isolation -e .`)"
    if info.TORCH_VERSION != torch.__version__:
        return f"extension built against torch {info.TORCH_VERSION}, running torch {torch.__version__}; rebuild it"
    if os.path.isdir(CSRC) and getattr(info, "SOURCES_SHA256", None) != sources_digest():
        return "extension built from other kernel sources than csrc/ holds now; rebuild it"
    if importlib.util.find_spec("rkd_fast._C") is None:
        return "extension not built (rkd_fast/_C*.so missing; run `pip install --no-build-isolation -e .`)"
    try:
        importlib.import_module("rkd_fast._C")
    except (ImportError, OSError) as exc:
        return f"extension failed to load: {exc}"
    _state["with_cuda"] = bool(info.WITH_CUDA)
    return None


def load_extension():
    """Loads the extension once; returns True when its kernels are registered."""
    if _state["reason"] is None and not _state["loaded"]:
        reason = _load()
        _state["loaded"] = reason is None
        _state["reason"] = reason
        if reason is not None and os.environ.get("RKD_FAST_NO_EXTENSION", "") != "1":
            warnings.warn(f"rkd_fast: compiled kernels unavailable ({reason}); using the Triton/reference paths",
                          RuntimeWarning, stacklevel=2)
    return _state["loaded"]


def extension_loaded():
    return _state["loaded"]


def extension_has_cuda():
    return _state["loaded"] and _state["with_cuda"]


def extension_reason():
    return _state["reason"]


def triton_available():
    """(available, reason). Triton runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1."""
    if not TRITON_INSTALLED:
        return False, "triton is not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") == "1":
        return True, None
    return False, "no GPU (set TRITON_INTERPRET=1 before importing triton to run its kernels on CPU)"
