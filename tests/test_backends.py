"""rkd_fast.backends(), the choice behind backend="auto", and `import rkd_fast` without a usable extension.
States that need a fresh interpreter (no extension, an extension built for another torch) run in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rkd_fast
from rkd_fast import _extension
from rkd_fast.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def _status_ok(status):
    return status == "available" or (status.startswith("unavailable: ") and len(status) > len("unavailable: "))


def test_backends_structure():
    report = rkd_fast.backends()
    assert "feature_distance" in report
    for op, entry in report.items():
        assert set(entry) == {"cpu", "cuda", "triton", "reference", "auto (cpu)", "auto (cuda)"}, op
        assert entry["reference"] == "available"
        for backend in KERNEL_BACKENDS:
            assert _status_ok(entry[backend]), (op, backend, entry[backend])
        for device in ("cpu", "cuda"):
            choice, _, why = entry[f"auto ({device})"].partition(": ")
            assert choice in ("cpu", "cuda", "triton", "reference") and why, (op, device, entry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_backends_without_gpu():
    entry = rkd_fast.backends()["feature_distance"]
    assert entry["cuda"].startswith("unavailable: no GPU")
    if entry["triton"] != "available":  # available only under TRITON_INTERPRET=1
        assert "GPU" in entry["triton"] or "not installed" in entry["triton"]


def test_auto_cpu_follows_the_cpu_status():
    entry = rkd_fast.backends()["feature_distance"]
    if entry["cpu"] == "available":
        assert entry["auto (cpu)"].startswith("cpu: ")
    else:
        reason = entry["cpu"].removeprefix("unavailable: ")
        assert entry["auto (cpu)"] == f"reference: C++ kernel unavailable: {reason}"


def test_cpu_status_says_what_happens():
    # "available" means the kernel runs; otherwise asking for it raises the reason backends() gives.
    status = rkd_fast.backends()["feature_distance"]["cpu"]
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    if status == "available":
        rkd_fast.feature_distance(s, t, backend="cpu")
    else:
        with pytest.raises(RuntimeError) as info:
            rkd_fast.feature_distance(s, t, backend="cpu")
        assert status.removeprefix("unavailable: ") in str(info.value)


def test_auto_on_cpu_runs_the_backend_it_names():
    choice = rkd_fast.backends()["feature_distance"]["auto (cpu)"].partition(": ")[0]
    for mode in ("mse", "normalized", "attention"):
        s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 6 if mode == "attention" else 4, 5, 5)
        auto = rkd_fast.feature_distance(s, t, mode=mode, reduction="none")
        assert torch.equal(auto, rkd_fast.feature_distance(s, t, mode=mode, reduction="none", backend=choice))


def test_loaded_extension_without_the_ops_kernel(monkeypatch):
    # An extension built before an op's kernels existed loads, but must not be offered for that op.
    assert _dispatch._kernel_registered("no_such_op", "CPU") is False
    monkeypatch.setattr(_extension, "extension_loaded", lambda: True)
    monkeypatch.setattr(_dispatch, "_kernel_registered", lambda op, key: False)
    reason = _dispatch.backend_status("feature_distance", "cpu", "cpu")
    assert reason is not None and "no CPU kernel" in reason
    assert _dispatch.auto_backend("feature_distance", "cpu") == ("reference", f"C++ kernel unavailable: {reason}")


@pytest.mark.parametrize("verified, runnable, expected", [
    ({}, True, "reference"),                                        # a GPU kernel that runs is not enough
    ({"fd_jacobian": ("cuda",)}, True, "reference"),                # another op's entry does not count
    ({"feature_distance": ("triton",)}, True, "triton"),
    ({"feature_distance": ("cuda",)}, True, "cuda"),
    ({"feature_distance": ("triton", "cuda")}, True, "cuda"),      # the C++/CUDA kernel first
    ({"feature_distance": ("cuda", "triton")}, False, "reference"),  # verified but cannot run here
])
def test_auto_on_cuda_needs_gpu_verified(monkeypatch, verified, runnable, expected):
    monkeypatch.setattr(_extension, "GPU_VERIFIED", verified)
    monkeypatch.setattr(_dispatch, "backend_status", lambda op, backend, device: None if runnable else "no GPU")
    choice, why = _dispatch.auto_backend("feature_distance", "cuda")
    assert choice == expected and why
    assert _dispatch.choose_backend("feature_distance", "auto", torch.device("cuda")) == expected
    if expected == "reference" and runnable:
        assert "GPU tests" in why


def test_auto_on_other_devices_is_the_reference():
    assert _dispatch.auto_backend("feature_distance", "meta")[0] == "reference"


# --- fresh interpreters --------------------------------------------------------------------------------------

def _probe(prepare="", **env):
    """In a new interpreter from the repository root: runs `prepare`, imports rkd_fast recording its warnings,
    and returns (as JSON) what a user would then see."""
    code = "import json, sys, types, warnings\nimport torch\n" + textwrap.dedent(prepare) + _PROBE
    full_env = {k: v for k, v in os.environ.items() if k not in ("RKD_FAST_NO_EXTENSION", "TRITON_INTERPRET")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PROBE = textwrap.dedent("""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import rkd_fast
        report = rkd_fast.backends()["feature_distance"]
        rkd_fast.backends()  # asking again must not warn again
        s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        auto = rkd_fast.feature_distance(s, t, mode="mse")
    try:
        rkd_fast.feature_distance(s, t, backend="cpu")
        cpu_error = None
    except RuntimeError as exc:
        cpu_error = str(exc)
    print(json.dumps({
        "report": report,
        "warnings": [str(w.message) for w in caught if "rkd_fast" in str(w.message)],
        "auto_is_reference": torch.equal(auto, rkd_fast.feature_distance(s, t, mode="mse", backend="reference")),
        "cpu_error": cpu_error,
        "library_loaded": "rkd_fast._C" in sys.modules,
        "torch_version": torch.__version__,
    }))
""")


def _fake_build_info(torch_version, sources_sha256=None):
    # rkd_fast/_extension.py imports rkd_fast._build_info (written by setup.py) before it loads the library;
    # a module placed in sys.modules first stands in for it. By default it records the current kernel sources.
    digest = sources_sha256 or _extension.sources_digest()
    return f"""
info = types.ModuleType("rkd_fast._build_info")
info.TORCH_VERSION, info.WITH_CUDA, info.CUDA_VERSION = {torch_version}, False, None
info.SOURCES_SHA256 = {digest!r}
sys.modules["rkd_fast._build_info"] = info
"""


def test_import_without_extension_falls_back():
    out = _probe(RKD_FAST_NO_EXTENSION="1")
    assert "RKD_FAST_NO_EXTENSION=1" in out["report"]["cpu"]
    assert out["report"]["auto (cpu)"].startswith("reference: ")
    assert "RKD_FAST_NO_EXTENSION=1" in out["report"]["auto (cpu)"]
    assert out["auto_is_reference"]
    assert "RKD_FAST_NO_EXTENSION=1" in out["cpu_error"]
    assert not out["library_loaded"]
    assert out["warnings"] == []  # switched off on purpose: nothing to warn about


def test_extension_for_another_torch_is_refused_with_a_warning():
    out = _probe(_fake_build_info("'1.0.0+other'"))
    expected = f"extension built against torch 1.0.0+other, running torch {out['torch_version']}; rebuild it"
    assert len(out["warnings"]) == 1 and expected in out["warnings"][0]
    assert out["report"]["cpu"] == f"unavailable: {expected}"
    assert out["report"]["auto (cpu)"] == f"reference: C++ kernel unavailable: {expected}"
    assert out["auto_is_reference"] and expected in out["cpu_error"]
    assert not out["library_loaded"]  # a library built for another torch is never loaded


def test_library_built_from_other_sources_is_refused_with_a_warning():
    # A library whose kernels may not match the schemas defined in Python is never loaded (registering a
    # mismatched kernel aborts the process).
    out = _probe(_fake_build_info("torch.__version__", sources_sha256="0" * 64))
    expected = "extension built from other kernel sources than csrc/ holds now; rebuild it"
    assert len(out["warnings"]) == 1 and expected in out["warnings"][0]
    assert out["report"]["cpu"] == f"unavailable: {expected}"
    assert not out["library_loaded"]


def test_missing_library_is_refused_with_a_warning():
    # Build info for this torch but no rkd_fast/_C*.so: `None` in sys.modules makes the library unfindable.
    out = _probe(_fake_build_info("torch.__version__") + 'sys.modules["rkd_fast._C"] = None\n')
    assert len(out["warnings"]) == 1 and "extension not built" in out["warnings"][0]
    assert out["report"]["cpu"].startswith("unavailable: extension not built")
    assert out["auto_is_reference"] and "extension not built" in out["cpu_error"]
