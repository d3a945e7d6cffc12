"""Triton kernels of rkd_fast::feature_distance_fwd_triton and rkd_fast::feature_distance_bwd_triton (same
schemas and contract as rkd_fast::feature_distance_fwd / _bwd, see rkd_fast/ops/feature_distance.py).

Per sample the loss depends on the data only through a few sums, and its gradient is linear in the inputs
with four per-sample coefficients (modes 0, 1):  d loss/d s = c0 s + c1 t,  d loss/d t = c2 s + c3 t.

forward (reads each input once, writes no gradient-sized tensor):
  1. `_pair_partials`, grid (sample, chunk): each program reduces one chunk of one sample to partial sums
     (mode 0: Σ(x-y)²; modes 1, 2: Σx², Σy², Σxy) written to a (N, chunks, 3) buffer. No atomics: the
     order of the sums is fixed, so results are deterministic.
  2. `_finalize`, grid (sample,): adds a sample's partials in order, writes its loss and coeffs[n] = (c0..c3).
backward (reads each input once, writes each asked-for gradient once):
  3. `_pair_grad`, grid (sample, chunk): grad_losses[n] · (c0 x + c1 y) and grad_losses[n] · (c2 x + c3 y).

Mode 2 ("attention"): the forward first builds the unnormalised maps a[n, hw] = Σ_c |F[c, hw]|^p of student
and teacher with `_attention_map` (each tensor through its own strides, so contiguous and channels_last are
read in place) and returns them; steps 1 and 2 run on the two maps (the coefficients are those of the
normalised mode on the maps). The backward's `_attention_grad` forms dL/da = c·(a_s, a_t) per position and
chains it into dL/dF = dL/da · p|F|^(p-1) sign(F).

Accumulation is in fp32 (fp64 for fp64 inputs), whatever the input dtype. On CPU the kernels run under the
Triton interpreter (TRITON_INTERPRET=1), with smaller blocks so that tests exercise the chunk loops.
"""

import contextlib

import torch
import triton
import triton.language as tl

MSE, NORMALIZED, ATTENTION = 0, 1, 2
NORM_EPS = 1e-12  # the floor of ‖x‖, as in torch.nn.functional.normalize and the reference
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _pair_partials(x_ptr, y_ptr, part_ptr, D, chunk, n_chunks, MODE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Partial sums over elements [c*chunk, (c+1)*chunk) of sample n; x and y are flat blocks of D per sample.
    `chunk` is a multiple of BLOCK, so chunks never overlap."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * D
    start = c.to(tl.int64) * chunk
    offs = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=ACC)
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, chunk, BLOCK):
        idx = start + i + offs
        mask = idx < D
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if MODE == 0:
            diff = x - y
            acc0 += diff * diff
        else:
            acc0 += x * x
            acc1 += y * y
            acc2 += x * y
    out = part_ptr + (n.to(tl.int64) * n_chunks + c) * 3
    tl.store(out, tl.sum(acc0, axis=0))
    tl.store(out + 1, tl.sum(acc1, axis=0))
    tl.store(out + 2, tl.sum(acc2, axis=0))


@triton.jit
def _finalize(part_ptr, loss_ptr, coef_ptr, n_chunks, D, MODE: tl.constexpr, ACC: tl.constexpr,
              EPS: tl.constexpr, BLOCK: tl.constexpr):
    """Sample n's loss and coef[n] = (c0, c1, c2, c3) of its gradient (mode 0: 2/D·(1, -1, -1, 1); mode 1:
    with norms floored at EPS, c0 = (2 - k_x)/‖x‖², c1 = c2 = -2/(‖x‖‖y‖), c3 = (2 - k_y)/‖y‖², where
    k_x = x̂·r and k_y = ŷ·(-r), r = 2(x̂ - ŷ), are the projections of the normalisation)."""
    n = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], dtype=ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    row = part_ptr + n.to(tl.int64) * n_chunks * 3
    for i in range(0, n_chunks, BLOCK):
        idx = i + offs
        mask = idx < n_chunks
        s0 += tl.load(row + idx * 3, mask=mask, other=0.0)
        s1 += tl.load(row + idx * 3 + 1, mask=mask, other=0.0)
        s2 += tl.load(row + idx * 3 + 2, mask=mask, other=0.0)
    xx = tl.sum(s0, axis=0)
    coef = coef_ptr + n.to(tl.int64) * 4
    if MODE == 0:
        size = tl.full([], 1.0, ACC) * D  # in ACC (fp64 for fp64); D = 0 gives 0/0 = NaN, the mean of nothing
        k = 2.0 / size
        tl.store(loss_ptr + n, (xx / size).to(ACC))
        tl.store(coef, k.to(ACC))
        tl.store(coef + 1, (-k).to(ACC))
        tl.store(coef + 2, (-k).to(ACC))
        tl.store(coef + 3, k.to(ACC))
    else:
        yy = tl.sum(s1, axis=0)
        xy = tl.sum(s2, axis=0)
        norm_x = tl.sqrt(xx)
        norm_y = tl.sqrt(yy)
        # written as where(norm < EPS, ...) so that a NaN norm stays NaN (as clamp_min does)
        inv_x = 1.0 / tl.where(norm_x < EPS, EPS, norm_x)
        inv_y = 1.0 / tl.where(norm_y < EPS, EPS, norm_y)
        xhat_xhat = xx * inv_x * inv_x
        yhat_yhat = yy * inv_y * inv_y
        xhat_yhat = xy * inv_x * inv_y
        tl.store(loss_ptr + n, (xhat_xhat + yhat_yhat - 2.0 * xhat_yhat).to(ACC))
        # below the floor the norm is a constant, so the gradient has no projection term
        proj_x = tl.where(norm_x > EPS, 2.0 * (xhat_xhat - xhat_yhat), 0.0)
        proj_y = tl.where(norm_y > EPS, 2.0 * (yhat_yhat - xhat_yhat), 0.0)
        cross = -2.0 * inv_x * inv_y
        tl.store(coef, ((2.0 - proj_x) * inv_x * inv_x).to(ACC))
        tl.store(coef + 1, cross.to(ACC))
        tl.store(coef + 2, cross.to(ACC))
        tl.store(coef + 3, ((2.0 - proj_y) * inv_y * inv_y).to(ACC))


@triton.jit
def _pair_grad(x_ptr, y_ptr, coef_ptr, gl_ptr, gx_ptr, gy_ptr, D, chunk, MODE: tl.constexpr,
               GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad_losses[n] · d loss_n/dx and grad_losses[n] · d loss_n/dy over one chunk (modes 0 and 1)."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * D
    start = c.to(tl.int64) * chunk
    offs = tl.arange(0, BLOCK)
    g = tl.load(gl_ptr + n)
    coef = coef_ptr + n.to(tl.int64) * 4
    k0 = tl.load(coef) * g
    k1 = tl.load(coef + 1) * g
    k2 = tl.load(coef + 2) * g
    k3 = tl.load(coef + 3) * g
    for i in range(0, chunk, BLOCK):
        idx = start + i + offs
        mask = idx < D
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if MODE == 0:
            # mse's coefficients are k·(1, -1, -1, 1): the difference first, exact when x and y are close
            diff = x - y
            gx = diff * k0
            gy = -(diff * k3)
        else:
            gx = k0 * x + k1 * y
            gy = k2 * x + k3 * y
        if GRAD_X:
            tl.store(gx_ptr + base + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if GRAD_Y:
            tl.store(gy_ptr + base + idx, gy.to(gy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _abs_pow(v, p, P_MODE: tl.constexpr):
    """|v|^p (P_MODE 2: p == 2, 1: p == 1, 0: any p > 0)."""
    if P_MODE == 2:
        out = v * v
    elif P_MODE == 1:
        out = tl.abs(v)
    else:
        a = tl.abs(v)
        # log2 of 1 instead of 0 keeps the unused branch finite; NaN != 0, so NaN propagates
        out = tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0.0, 1.0, a))))
    return out


@triton.jit
def _abs_pow_grad(v, p, P_MODE: tl.constexpr):
    """d|v|^p / dv = p |v|^(p-1) sign(v) with sign(0) = 0, as autograd through abs().pow(p) computes it: 0 at
    v = 0 for p >= 1, and inf * 0 = NaN there for p < 1 (where |v|^p has no derivative)."""
    if P_MODE == 2:
        out = 2.0 * v
    else:
        sign = tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, v * 0.0))  # v * 0 keeps NaN as NaN
        if P_MODE == 1:
            out = sign
        else:
            a = tl.abs(v)
            mag = p * tl.exp2((p - 1.0) * tl.log2(tl.where(a == 0.0, 1.0, a)))  # log2(0) never evaluated
            at_zero = tl.where(p < 1.0, float("nan"), 0.0)  # p 0^(p-1) sign(0): inf * 0 for p < 1
            out = tl.where(a == 0.0, at_zero, mag * sign)
    return out


@triton.jit
def _attention_map(f_ptr, a_ptr, C, HW, stride_n, stride_c, stride_hw, p_ptr, P_MODE: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """a[n, hw] = Σ_c |F[n, c, hw]|^p for one block of hw; element (c, hw) of sample n is at
    n*stride_n + c*stride_c + hw*stride_hw (contiguous: stride_hw = 1; channels_last: stride_c = 1).
    p is read from memory in ACC: a float argument would reach the kernel as fp32."""
    n = tl.program_id(0)
    p = tl.load(p_ptr)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    cs = tl.arange(0, BLOCK_C)
    base = f_ptr + n.to(tl.int64) * stride_n
    hw_off = hw.to(tl.int64)[None, :] * stride_hw
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c < C)[:, None] & hw_mask[None, :]
        v = tl.load(base + c.to(tl.int64)[:, None] * stride_c + hw_off, mask=mask, other=0.0).to(ACC)
        acc += _abs_pow(v, p, P_MODE)
    tl.store(a_ptr + n.to(tl.int64) * HW + hw, tl.sum(acc, axis=0), mask=hw_mask)


@triton.jit
def _attention_grad(f_ptr, g_ptr, a_s_ptr, a_t_ptr, coef_ptr, gl_ptr, SELF: tl.constexpr, C, HW, stride_n,
                    stride_c, stride_hw, g_stride_n, g_stride_c, g_stride_hw, p_ptr, P_MODE: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """grad_losses[n] · dL/dF[n, c, hw] = grad_losses[n] · dL/da[n, hw] · p|F|^(p-1) sign(F) for one tensor
    (SELF = 0: student, dL/da_s = c0 a_s + c1 a_t; SELF = 1: teacher, dL/da_t = c2 a_s + c3 a_t)."""
    n = tl.program_id(0)
    p = tl.load(p_ptr)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    g = tl.load(gl_ptr + n)
    coef = coef_ptr + n.to(tl.int64) * 4
    k_s = tl.load(coef + 2 * SELF) * g
    k_t = tl.load(coef + 2 * SELF + 1) * g
    row = n.to(tl.int64) * HW + hw
    a_s = tl.load(a_s_ptr + row, mask=hw_mask, other=0.0)
    a_t = tl.load(a_t_ptr + row, mask=hw_mask, other=0.0)
    grad_a = k_s * a_s + k_t * a_t  # dL/da over this block of hw, already scaled by grad_losses[n]
    cs = tl.arange(0, BLOCK_C)
    base = f_ptr + n.to(tl.int64) * stride_n
    g_base = g_ptr + n.to(tl.int64) * g_stride_n
    hw64 = hw.to(tl.int64)[None, :]
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + cs).to(tl.int64)[:, None]
        mask = (c < C) & hw_mask[None, :]
        v = tl.load(base + c * stride_c + hw64 * stride_hw, mask=mask, other=0.0).to(ACC)
        grad = grad_a[None, :] * _abs_pow_grad(v, p, P_MODE)
        tl.store(g_base + c * g_stride_c + hw64 * g_stride_hw, grad.to(g_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launch


def _config(device):
    """Block sizes and the number of programs to aim for. Under the interpreter each program is a Python
    call, so few programs and small blocks (which still exercise the chunk loops at test sizes)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"block": 1024, "block_c": 32, "block_hw": 64, "programs": 8 * props.multi_processor_count,
                "num_warps": 4}
    return {"block": 64, "block_c": 4, "block_hw": 16, "programs": 8, "num_warps": 4}


def _hw_stride(x):
    """Stride between consecutive hw = h*W + w positions of a contiguous or channels_last 4-D tensor (a size-1
    dim may carry any stride, so take the innermost spatial dim with more than one element)."""
    return x.stride(3) if x.shape[3] > 1 else x.stride(2)


def _same_flat_order(student, teacher):
    if student.is_contiguous() and teacher.is_contiguous():
        return True
    return (student.dim() == 4 and student.is_contiguous(memory_format=torch.channels_last)
            and teacher.is_contiguous(memory_format=torch.channels_last))


def _in_place_layout(x):
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _check(student, teacher, mode, p):
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {x.dtype} (float32, float16, bfloat16 or float64)")
    if student.dtype != teacher.dtype:
        raise TypeError(f"student and teacher dtypes differ: {student.dtype} and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher are on different devices: {student.device} and {teacher.device}")
    if mode not in (MSE, NORMALIZED, ATTENTION):
        raise ValueError(f"mode must be 0 (mse), 1 (normalized) or 2 (attention), got {mode!r}")
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher need the same batch size in dim 0, got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if mode == ATTENTION:
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[2:] != teacher.shape[2:]:
            raise ValueError("mode 2 (attention) takes 4-D (N, C, H, W) maps with equal H, W, got shapes "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if not (_in_place_layout(student) and _in_place_layout(teacher)):
            raise ValueError("mode 2 (attention) reads contiguous or channels_last tensors; got strides "
                             f"{student.stride()} and {teacher.stride()}")
        if not (p > 0 and p != float("inf")):
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
    else:
        if student.shape != teacher.shape:
            raise ValueError(f"modes 0 and 1 need equal shapes, got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        if not _same_flat_order(student, teacher):
            raise ValueError("modes 0 and 1 need student and teacher both contiguous or both channels_last; got "
                             f"strides {student.stride()} and {teacher.stride()}")


def _check_saved(grad_losses, student, coeffs, map_s, map_t, mode):
    """The backward's own inputs: what the forward returned (or grad_losses shaped like its losses)."""
    acc, _ = _acc_dtypes(student.dtype)
    n = student.shape[0]
    hw = student.shape[2] * student.shape[3] if mode == ATTENTION else 0
    expected = {"grad_losses": (grad_losses, (n,)), "coeffs": (coeffs, (n, 4))}
    if mode == ATTENTION:
        expected.update(map_s=(map_s, (n, hw)), map_t=(map_t, (n, hw)))
    for name, (x, shape) in expected.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape or x.dtype != acc or not x.is_contiguous() or x.device != student.device:
            raise ValueError(f"{name} must be a contiguous {acc} tensor of shape {shape} on {student.device}, "
                             f"got {x.dtype} {tuple(x.shape)} with strides {x.stride()} on {x.device}")


def _acc_dtypes(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _chunking(size, rows, cfg):
    """(chunk, n_chunks) for `rows` samples of `size` elements: enough programs to fill the device, chunks a
    multiple of the block and at least one chunk (so that a sample of size 0 still gets its loss written)."""
    block = cfg["block"]
    wanted = max(1, -(-cfg["programs"] // max(rows, 1)))
    n_chunks = max(1, min(wanted, triton.cdiv(size, block)))
    chunk = triton.cdiv(triton.cdiv(max(size, 1), n_chunks), block) * block
    return chunk, triton.cdiv(max(size, 1), chunk)


def _device_guard(x):
    """Launches go to the inputs' device (and its current stream), whatever the current device is."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _pair_stats(x, y, losses, coef, mode, size, acc_tl, cfg):
    """Steps 1-2 for flat samples of `size` elements (modes 0 and 1, and the attention maps)."""
    n = x.shape[0]
    chunk, n_chunks = _chunking(size, n, cfg)
    partials = torch.empty((n, n_chunks, 3), dtype=losses.dtype, device=x.device)
    _pair_partials[(n, n_chunks)](x, y, partials, size, chunk, n_chunks, MODE=mode, ACC=acc_tl,
                                  BLOCK=cfg["block"], num_warps=cfg["num_warps"])
    _finalize[(n,)](partials, losses, coef, n_chunks, size, MODE=mode, ACC=acc_tl, EPS=NORM_EPS, BLOCK=64,
                    num_warps=1)


def _p_kind(p):
    return 2 if p == 2.0 else 1 if p == 1.0 else 0


def forward(student, teacher, mode, p):
    """(losses, coeffs, map_s, map_t) as rkd_fast::feature_distance_fwd defines them.

    losses (N,) and coeffs (N, 4) are float32 (float64 for float64 inputs); map_s, map_t are the unnormalised
    attention maps (N, H*W) in mode 2 and empty (0,) tensors otherwise. Each input is read once."""
    _check(student, teacher, mode, p)
    acc, acc_tl = _acc_dtypes(student.dtype)
    n = student.shape[0]
    losses = student.new_empty((n,), dtype=acc)
    coeffs = student.new_empty((n, 4), dtype=acc)
    hw = student.shape[2] * student.shape[3] if mode == ATTENTION else 0
    map_s = student.new_empty((n, hw) if mode == ATTENTION else (0,), dtype=acc)
    map_t = student.new_empty((n, hw) if mode == ATTENTION else (0,), dtype=acc)
    if n == 0:
        return losses, coeffs, map_s, map_t
    cfg = _config(student.device)
    with _device_guard(student):
        if mode != ATTENTION:
            _pair_stats(student, teacher, losses, coeffs, mode, student[0].numel(), acc_tl, cfg)
            return losses, coeffs, map_s, map_t
        p_acc = torch.full((1,), float(p), dtype=acc, device=student.device)
        grid = (n, max(1, triton.cdiv(hw, cfg["block_hw"])))
        for f, a in ((student, map_s), (teacher, map_t)):
            _attention_map[grid](f, a, f.shape[1], hw, f.stride(0), f.stride(1), _hw_stride(f), p_acc,
                                 P_MODE=_p_kind(float(p)), ACC=acc_tl, BLOCK_C=cfg["block_c"],
                                 BLOCK_HW=cfg["block_hw"], num_warps=cfg["num_warps"])
        _pair_stats(map_s, map_t, losses, coeffs, NORMALIZED, hw, acc_tl, cfg)
    return losses, coeffs, map_s, map_t


def backward(grad_losses, student, teacher, coeffs, map_s, map_t, mode, p, grad_student, grad_teacher):
    """(grad_student, grad_teacher) as rkd_fast::feature_distance_bwd defines them: grad_losses[i] times
    d loss_i/d input_i, `empty_like` the input (same strides) in its dtype when asked for, else an empty (0,)
    tensor. Modes 0 and 1 read student and teacher once for both gradients."""
    _check(student, teacher, mode, p)
    _check_saved(grad_losses, student, coeffs, map_s, map_t, mode)
    grad_s = torch.empty_like(student) if grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    n = student.shape[0]
    if n == 0 or not (grad_student or grad_teacher):
        return grad_s, grad_t
    _, acc_tl = _acc_dtypes(student.dtype)
    cfg = _config(student.device)
    with _device_guard(student):
        if mode != ATTENTION:
            size = student[0].numel()
            chunk, n_chunks = _chunking(size, n, cfg)
            dummy = student  # a pointer the kernel never writes when its GRAD_ flag is off
            _pair_grad[(n, n_chunks)](student, teacher, coeffs, grad_losses, grad_s if grad_student else dummy,
                                      grad_t if grad_teacher else dummy, size, chunk, MODE=mode,
                                      GRAD_X=grad_student, GRAD_Y=grad_teacher, ACC=acc_tl, BLOCK=cfg["block"],
                                      num_warps=cfg["num_warps"])
            return grad_s, grad_t
        hw = student.shape[2] * student.shape[3]
        p_acc = torch.full((1,), float(p), dtype=coeffs.dtype, device=student.device)
        grid = (n, max(1, triton.cdiv(hw, cfg["block_hw"])))
        for i, (f, g, needed) in enumerate(((student, grad_s, grad_student), (teacher, grad_t, grad_teacher))):
            if not needed:
                continue
            _attention_grad[grid](f, g, map_s, map_t, coeffs, grad_losses, i, f.shape[1], hw, f.stride(0),
                                  f.stride(1), _hw_stride(f), g.stride(0), g.stride(1), _hw_stride(g), p_acc,
                                  P_MODE=_p_kind(float(p)), ACC=acc_tl, BLOCK_C=cfg["block_c"],
                                  BLOCK_HW=cfg["block_hw"], num_warps=cfg["num_warps"])
    return grad_s, grad_t
