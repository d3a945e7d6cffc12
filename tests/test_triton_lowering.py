"""The Triton kernels compile for the GPUs the project targets (sm_80, sm_90), on a machine without one.

tests/triton runs the kernels under the interpreter, which never lowers them: a kernel that the interpreter runs
may still fail to compile (an unsupported construct, a type that does not unify across an `if`). Compiling needs
triton without TRITON_INTERPRET, so it runs in a process of its own. What this checks is that they compile, not
that they are right on a GPU (the triton-cuda cases of tests/test_<op>.py)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_COMPILE = textwrap.dedent("""
    import itertools
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rkd_fast.ops.triton import fd_jacobian, feature_distance

    def signature(names, types, constexprs):
        return {**dict(zip(names, types)), **{name: "constexpr" for name in constexprs}}

    def lower(fn, sig, constexprs, arch):
        ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                             target=GPUTarget("cuda", arch, 32)).asm["ptx"]
        assert ".entry" in ptx

    for arch, (dtype, acc) in itertools.product((80, 90), (("bf16", tl.float32), ("fp64", tl.float64))):
        a = "*fp64" if acc == tl.float64 else "*fp32"
        x = "*" + dtype
        flat = signature(("x_ptr", "y_ptr", "gx_ptr", "gy_ptr", "part_ptr", "count_ptr", "loss_ptr", "params_ptr",
                          "D", "chunk", "n_chunks"), (x, x, x, x, a, "*i32", a, a, "i64", "i64", "i32"),
                         ("MODE", "GRAD_X", "GRAD_Y", "ACC", "EPS", "BLOCK"))
        for mode in (0, 1):
            lower(feature_distance._flat_fused, flat,
                  {"MODE": mode, "GRAD_X": True, "GRAD_Y": True, "ACC": acc, "EPS": 1e-12, "BLOCK": 1024}, arch)
        ints = ("Cs", "Ct", "HW", "s_sn", "s_sc", "s_shw", "t_sn", "t_sc", "t_shw", "gs_sn", "gs_sc", "gs_shw",
                "gt_sn", "gt_sc", "gt_shw", "n_chunks")
        attention = signature(("s_ptr", "t_ptr", "gs_ptr", "gt_ptr", "map_ptr", "part_ptr", "count_ptr", "loss_ptr",
                               "params_ptr") + ints, (x, x, x, x, a, a, "*i32", a, a) + ("i64",) * len(ints),
                              ("P_MODE", "GRAD_S", "GRAD_T", "ACC", "EPS", "BLOCK_C", "BLOCK_HW"))
        for p_mode in (0, 2):
            lower(feature_distance._attention_fused, attention,
                  {"P_MODE": p_mode, "GRAD_S": True, "GRAD_T": True, "ACC": acc, "EPS": 1e-12, "BLOCK_C": 32,
                   "BLOCK_HW": 64}, arch)
        rows = signature(("sc_ptr", "sp_ptr", "tc_ptr", "tp_ptr", "h_ptr", "h_stride", "params_ptr", "loss_ptr",
                          "gc_ptr", "gp_ptr", "K", "sc_rs", "sp_rs", "tc_rs", "tp_rs"),
                         (x, x, x, x, a, "i64", a, a, x, x, "i64", "i64", "i64", "i64", "i64"),
                         ("PROBS", "TEACHER", "GRAD_C", "GRAD_P", "ACC", "BLOCK"))
        for probs in (False, True):
            lower(fd_jacobian._fd_jacobian_rows, rows, {"PROBS": probs, "TEACHER": True, "GRAD_C": True,
                                                        "GRAD_P": True, "ACC": acc, "BLOCK": 1024}, arch)
    print("lowered")
""")


def test_triton_kernels_compile_for_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "lowered" in proc.stdout, proc.stderr[-4000:]
