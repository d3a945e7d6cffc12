"""Triton kernel of rkd_fast::fd_jacobian_fwd_triton (same schema and contract as rkd_fast::fd_jacobian_fwd,
see rkd_fast/ops/fd_jacobian.py).

One program per sample (row of K outputs). K is small (10 to 1000), so a row of each input fits one block and
the loops below run once; larger K is walked in blocks. With on="probs" the program first finds each row's
max and softmax normaliser (the max subtracted, so exp never overflows), then:

  loop 1: u = ((g(s') - g(s)) - (g(t') - g(t))) / h, loss = Σ u². With on="logits" the gradients
          (d loss / d s' = 2u/h = v, d loss / d s = -v, times the row's weight in the reduced loss: 1/N for the
          mean) are written here too.
  loop 2 (on="probs" with a gradient asked for): d loss / d s' = p' ⊙ (v - <p', v>) / T and
          d loss / d s = -p ⊙ (v - <p, v>) / T, the dot products having been summed in loop 1.

Accumulation is in fp32 (fp64 for fp64 inputs), whatever the input dtype. On CPU the kernel runs under the
Triton interpreter (TRITON_INTERPRET=1), with a small block so that tests exercise the block loops.
"""

import os

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _softmax_stats(x_ptr, K, inv_t, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(max, 1/Σ exp((x - max)/T)) of one row of K elements."""
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), dtype=ACC)
    for start in range(0, K, BLOCK):
        idx = start + offs
        x = tl.load(x_ptr + idx, mask=idx < K, other=float("-inf")).to(ACC)
        mx = tl.maximum(mx, x)
    row_max = tl.max(mx, axis=0)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        idx = start + offs
        mask = idx < K
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
        total += tl.where(mask, tl.exp((x - row_max) * inv_t), 0.0)
    return row_max, 1.0 / tl.sum(total, axis=0)


@triton.jit
def _g(x_ptr, idx, mask, row_max, inv_sum, inv_t, PROBS: tl.constexpr, ACC: tl.constexpr):
    """g(x) at idx: the value itself (logits) or its softmax probability."""
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    if PROBS:
        x = tl.where(mask, tl.exp((x - row_max) * inv_t) * inv_sum, 0.0)
    return x


@triton.jit
def _difference(gc, gp, tc_ptr, tp_ptr, idx, mask, m_tc, z_tc, m_tp, z_tp, inv_t, PROBS: tl.constexpr,
                TEACHER: tl.constexpr, ACC: tl.constexpr):
    """g(s_pert) − g(s_clean), less the teacher's g(t_pert) − g(t_clean) when matching Jacobians."""
    diff = gp - gc
    if TEACHER:
        diff -= _g(tp_ptr, idx, mask, m_tp, z_tp, inv_t, PROBS, ACC) - _g(tc_ptr, idx, mask, m_tc, z_tc, inv_t,
                                                                           PROBS, ACC)
    return diff


@triton.jit
def _fd_jacobian_rows(sc_ptr, sp_ptr, tc_ptr, tp_ptr, h_ptr, h_stride, params_ptr, loss_ptr, gc_ptr, gp_ptr, K,
                      sc_rs, sp_rs, tc_rs, tp_rs, PROBS: tl.constexpr, TEACHER: tl.constexpr,
                      GRAD_C: tl.constexpr, GRAD_P: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    sc_ptr += n * sc_rs
    sp_ptr += n * sp_rs
    tc_ptr += n * tc_rs
    tp_ptr += n * tp_rs
    gc_ptr += n * K  # the gradients are contiguous (N, K)
    gp_ptr += n * K
    inv_h = 1.0 / tl.load(h_ptr + n * h_stride).to(ACC)  # h_stride 0: one step for every row
    inv_t = tl.load(params_ptr).to(ACC)
    weight = tl.load(params_ptr + 1).to(ACC)  # the row's weight in the reduced loss: 1/N for the mean

    # Softmax statistics of each row; unused (and not computed) with on="logits".
    m_sc, z_sc = 0.0, 1.0
    m_sp, z_sp = 0.0, 1.0
    m_tc, z_tc = 0.0, 1.0
    m_tp, z_tp = 0.0, 1.0
    if PROBS:
        m_sc, z_sc = _softmax_stats(sc_ptr, K, inv_t, ACC, BLOCK)
        m_sp, z_sp = _softmax_stats(sp_ptr, K, inv_t, ACC, BLOCK)
        if TEACHER:
            m_tc, z_tc = _softmax_stats(tc_ptr, K, inv_t, ACC, BLOCK)
            m_tp, z_tp = _softmax_stats(tp_ptr, K, inv_t, ACC, BLOCK)

    offs = tl.arange(0, BLOCK)
    loss = tl.zeros([BLOCK], dtype=ACC)
    dot_c = tl.zeros([BLOCK], dtype=ACC)  # Σ p v and Σ p' v, for the softmax gradients
    dot_p = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, K, BLOCK):
        idx = start + offs
        mask = idx < K
        gc = _g(sc_ptr, idx, mask, m_sc, z_sc, inv_t, PROBS, ACC)
        gp = _g(sp_ptr, idx, mask, m_sp, z_sp, inv_t, PROBS, ACC)
        diff = _difference(gc, gp, tc_ptr, tp_ptr, idx, mask, m_tc, z_tc, m_tp, z_tp, inv_t, PROBS, TEACHER, ACC)
        u = diff * inv_h
        loss += u * u
        v = 2.0 * weight * inv_h * u
        if PROBS:
            dot_c += gc * v
            dot_p += gp * v
        else:
            if GRAD_P:
                tl.store(gp_ptr + idx, v.to(gp_ptr.dtype.element_ty), mask=mask)
            if GRAD_C:
                tl.store(gc_ptr + idx, (-v).to(gc_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + n, tl.sum(loss, axis=0))

    if PROBS and (GRAD_C or GRAD_P):
        a_c = tl.sum(dot_c, axis=0)
        a_p = tl.sum(dot_p, axis=0)
        for start in range(0, K, BLOCK):
            idx = start + offs
            mask = idx < K
            gc = _g(sc_ptr, idx, mask, m_sc, z_sc, inv_t, PROBS, ACC)
            gp = _g(sp_ptr, idx, mask, m_sp, z_sp, inv_t, PROBS, ACC)
            diff = _difference(gc, gp, tc_ptr, tp_ptr, idx, mask, m_tc, z_tc, m_tp, z_tp, inv_t, PROBS, TEACHER, ACC)
            v = 2.0 * weight * inv_h * inv_h * diff
            if GRAD_P:
                tl.store(gp_ptr + idx, (gp * (v - a_p) * inv_t).to(gp_ptr.dtype.element_ty), mask=mask)
            if GRAD_C:
                tl.store(gc_ptr + idx, (gc * (a_c - v) * inv_t).to(gc_ptr.dtype.element_ty), mask=mask)


def _max_block():
    # Under the interpreter a small block makes the tests walk the block loops; on a GPU one block holds a row.
    return 64 if os.environ.get("TRITON_INTERPRET", "") == "1" else 4096


def _check_rows(name, x, ref):
    if x.dim() != 2 or x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"fd_jacobian_fwd_triton: {name} must be {ref.dtype} of shape {tuple(ref.shape)} on "
                         f"{ref.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"fd_jacobian_fwd_triton: {name} rows must be unit-stride")


def forward(s_clean, s_pert, h, t_clean, t_pert, temperature, options):
    """(loss, grad_clean, grad_pert) as rkd_fast::fd_jacobian_fwd defines them (options: on in bit 0, the
    reduction in bits 1-2, grad_clean and grad_pert in bits 3 and 4)."""
    if s_clean.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fd_jacobian_fwd_triton: unsupported dtype {s_clean.dtype}")
    if s_clean.dim() != 2:
        raise ValueError(f"fd_jacobian_fwd_triton: s_clean must be 2-D (N, K), got {tuple(s_clean.shape)}")
    _check_rows("s_clean", s_clean, s_clean)
    _check_rows("s_pert", s_pert, s_clean)
    if (t_clean is None) != (t_pert is None):
        raise ValueError("fd_jacobian_fwd_triton: give both t_clean and t_pert or neither")
    teacher = t_clean is not None
    if teacher:
        _check_rows("t_clean", t_clean, s_clean)
        _check_rows("t_pert", t_pert, s_clean)
    if not 0 <= options < 32 or (options >> 1) & 3 == 3:
        raise ValueError(f"fd_jacobian_fwd_triton: options must be an int of 5 bits with a reduction of 0-2, got "
                         f"{options}")
    probs, reduction, grad_clean, grad_pert = options & 1, (options >> 1) & 3, bool(options & 8), bool(options & 16)
    n, k = s_clean.shape
    acc = torch.float64 if s_clean.dtype == torch.float64 else torch.float32
    if h.shape not in ((), (n,)) or h.dtype != acc or not h.is_contiguous():
        raise ValueError(f"fd_jacobian_fwd_triton: h must be a contiguous {acc} tensor of shape () or ({n},)")

    losses = torch.empty((n,), dtype=acc, device=s_clean.device)
    grad_c = torch.empty_like(s_clean, memory_format=torch.contiguous_format) if grad_clean \
        else s_clean.new_empty((0,))
    grad_p = torch.empty_like(s_pert, memory_format=torch.contiguous_format) if grad_pert \
        else s_pert.new_empty((0,))
    if n > 0:
        # 1/temperature and the row weight go in as a tensor of the accumulation dtype: Python floats would be fp32
        weight = 1.0 / n if reduction == 0 else 1.0
        params = torch.tensor([1.0 / temperature, weight], dtype=acc, device=s_clean.device)
        block = min(triton.next_power_of_2(max(k, 1)), _max_block())
        # Unused pointers (no teacher, a gradient not asked for) get a valid tensor; constexpr flags skip them.
        tc, tp = (t_clean, t_pert) if teacher else (s_clean, s_clean)
        _fd_jacobian_rows[(n,)](
            s_clean, s_pert, tc, tp, h, 0 if h.dim() == 0 else 1, params, losses, grad_c if grad_clean else s_clean,
            grad_p if grad_pert else s_clean, k, s_clean.stride(0), s_pert.stride(0), tc.stride(0), tp.stride(0),
            PROBS=probs == 1, TEACHER=teacher, GRAD_C=grad_clean, GRAD_P=grad_pert,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
            num_warps=max(1, min(8, block // 256)))
    if reduction == 2:
        return losses, grad_c, grad_p
    return (losses.mean() if reduction == 0 else losses.sum()), grad_c, grad_p
