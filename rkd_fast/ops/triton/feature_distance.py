"""Triton kernels of rkd_fast::feature_distance_fwd_triton (same schema and contract as
rkd_fast::feature_distance_fwd, see rkd_fast/ops/feature_distance.py).

Per sample the loss and both gradients depend on the data only through a few sums, so the op runs as:

  1. `_pair_partials`, grid (sample, chunk): each program reduces one chunk of one sample to partial sums
     (mode 0: Σ(x-y)²; modes 1, 2: Σx², Σy², Σxy) written to a (N, chunks, 3) buffer. No atomics: the
     order of the sums is fixed, so results are deterministic.
  2. `_finalize`, grid (sample,): adds a sample's partials in order, writes its loss and the per-sample
     coefficients that the gradient needs (1/‖x‖, 1/‖y‖ and the projections x̂·r, ŷ·r).
  3. only when a gradient is asked for: `_pair_grad` (or `_attention_grad`), grid (sample, chunk), reads the
     sample again and writes the gradients.

Mode 2 ("attention") first builds the maps a[n, hw] = Σ_c |F[c, hw]|^p of student and teacher into an fp32
(fp64 for fp64) scratch of shape (N, H·W) with `_attention_map` (each tensor through its own strides, so
contiguous and channels_last are read in place); steps 1 and 2 then run on the two maps, and
`_attention_grad` chains dL/da into dL/dF.

When gradients are needed the samples are processed in groups whose bytes fit in about half the L2 cache,
running steps 1-3 per group, so that the second read of a sample is likely an L2 hit on a GPU.

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
    """Sample n's loss, and coef[n] = (1/‖x‖, 1/‖y‖, x̂·r, ŷ·(-r)) with r = 2(x̂ - ŷ), norms floored at EPS
    (mode 0: coef[n, 0] = 2/D)."""
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
        tl.store(loss_ptr + n, (xx / size).to(ACC))
        tl.store(coef, (2.0 / size).to(ACC))
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
        tl.store(coef, inv_x.to(ACC))
        tl.store(coef + 1, inv_y.to(ACC))
        tl.store(coef + 2, proj_x.to(ACC))
        tl.store(coef + 3, proj_y.to(ACC))


@triton.jit
def _pair_grad(x_ptr, y_ptr, coef_ptr, gx_ptr, gy_ptr, D, chunk, MODE: tl.constexpr, GRAD_X: tl.constexpr,
               GRAD_Y: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """d loss_n / dx and d loss_n / dy over one chunk (modes 0 and 1)."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * D
    start = c.to(tl.int64) * chunk
    offs = tl.arange(0, BLOCK)
    coef = coef_ptr + n.to(tl.int64) * 4
    k0 = tl.load(coef)
    k1 = tl.load(coef + 1)
    k2 = tl.load(coef + 2)
    k3 = tl.load(coef + 3)
    for i in range(0, chunk, BLOCK):
        idx = start + i + offs
        mask = idx < D
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if MODE == 0:
            gx = (x - y) * k0  # 2(x - y)/D, the difference first so that it stays exact
            gy = -gx
        else:
            xhat = x * k0
            yhat = y * k1
            r = 2.0 * (xhat - yhat)
            gx = (r - xhat * k2) * k0
            gy = (-r - yhat * k3) * k1
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
def _attention_grad(f_ptr, g_ptr, a_self_ptr, a_other_ptr, coef_ptr, SELF: tl.constexpr, C, HW, stride_n,
                    stride_c, stride_hw, g_stride_n, g_stride_c, g_stride_hw, p_ptr, P_MODE: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dL/dF[n, c, hw] = dL/da[n, hw] · p|F|^(p-1) sign(F) for one tensor (SELF = 0 student, 1 teacher)."""
    n = tl.program_id(0)
    p = tl.load(p_ptr)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    coef = coef_ptr + n.to(tl.int64) * 4
    inv_self = tl.load(coef + SELF)
    inv_other = tl.load(coef + 1 - SELF)
    proj = tl.load(coef + 2 + SELF)
    row = n.to(tl.int64) * HW + hw
    a_hat = tl.load(a_self_ptr + row, mask=hw_mask, other=0.0) * inv_self
    b_hat = tl.load(a_other_ptr + row, mask=hw_mask, other=0.0) * inv_other
    grad_a = (2.0 * (a_hat - b_hat) - a_hat * proj) * inv_self  # dL/da over this block of hw
    cs = tl.arange(0, BLOCK_C)
    base = f_ptr + n.to(tl.int64) * stride_n
    g_base = g_ptr + n.to(tl.int64) * g_stride_n
    hw64 = hw.to(tl.int64)[None, :]
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + cs).to(tl.int64)[:, None]
        mask = (c < C) & hw_mask[None, :]
        v = tl.load(base + c * stride_c + hw64 * stride_hw, mask=mask, other=0.0).to(ACC)
        g = grad_a[None, :] * _abs_pow_grad(v, p, P_MODE)
        tl.store(g_base + c * g_stride_c + hw64 * g_stride_hw, g.to(g_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launch


def _config(device):
    """Block sizes and the number of programs to aim for. Under the interpreter each program is a Python
    call, so few programs and small blocks (which still exercise the chunk loops at test sizes)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 0) or 40 * 2**20
        return {"block": 1024, "block_c": 32, "block_hw": 64, "programs": 8 * props.multi_processor_count,
                "group_bytes": l2_bytes // 2, "num_warps": 4}
    return {"block": 64, "block_c": 4, "block_hw": 16, "programs": 8, "group_bytes": 1 << 16, "num_warps": 4}


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


def _groups(n, bytes_per_sample, cfg, two_pass):
    """Sample ranges processed together: all at once when each sample is read once, else groups that fit in
    about half the L2 cache so that the gradient pass re-reads them from L2."""
    size = n if not two_pass else max(1, min(n, cfg["group_bytes"] // max(bytes_per_sample, 1)))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _pair_stats_and_grad(x, y, losses, coef, gx, gy, mode, size, acc_tl, cfg, groups):
    """Steps 1-3 for flat samples of `size` elements (modes 0 and 1, and the attention maps)."""
    n = x.shape[0]
    chunk, n_chunks = _chunking(size, groups[0][1] - groups[0][0], cfg)
    partials = torch.empty((n, n_chunks, 3), dtype=losses.dtype, device=x.device)
    for lo, hi in groups:
        rows = hi - lo
        _pair_partials[(rows, n_chunks)](x[lo:hi], y[lo:hi], partials[lo:hi], size, chunk, n_chunks,
                                        MODE=min(mode, NORMALIZED), ACC=acc_tl, BLOCK=cfg["block"],
                                        num_warps=cfg["num_warps"])
        _finalize[(rows,)](partials[lo:hi], losses[lo:hi], coef[lo:hi], n_chunks, size,
                           MODE=min(mode, NORMALIZED), ACC=acc_tl, EPS=NORM_EPS, BLOCK=64, num_warps=1)
        if gx is not None or gy is not None:
            dummy = x[lo:hi]  # a pointer the kernel never writes when its GRAD_ flag is off
            _pair_grad[(rows, n_chunks)](x[lo:hi], y[lo:hi], coef[lo:hi],
                                         gx[lo:hi] if gx is not None else dummy,
                                         gy[lo:hi] if gy is not None else dummy, size, chunk, MODE=mode,
                                         GRAD_X=gx is not None, GRAD_Y=gy is not None, ACC=acc_tl,
                                         BLOCK=cfg["block"], num_warps=cfg["num_warps"])


def _attention(student, teacher, p, losses, coef, grad_s, grad_t, acc, acc_tl, cfg, groups):
    n, hw = student.shape[0], student.shape[2] * student.shape[3]
    p_mode = 2 if p == 2.0 else 1 if p == 1.0 else 0
    maps = torch.empty((2, n, hw), dtype=acc, device=student.device)
    p_acc = torch.full((1,), p, dtype=acc, device=student.device)
    blocks = dict(ACC=acc_tl, BLOCK_C=cfg["block_c"], BLOCK_HW=cfg["block_hw"], num_warps=cfg["num_warps"])
    grid_hw = max(1, triton.cdiv(hw, cfg["block_hw"]))
    for lo, hi in groups:
        rows = hi - lo
        for i, f in enumerate((student, teacher)):
            f = f[lo:hi]
            _attention_map[(rows, grid_hw)](f, maps[i, lo:hi], f.shape[1], hw, f.stride(0), f.stride(1),
                                            _hw_stride(f), p_acc, P_MODE=p_mode, **blocks)
        _pair_stats_and_grad(maps[0, lo:hi], maps[1, lo:hi], losses[lo:hi], coef[lo:hi], None, None,
                             NORMALIZED, hw, acc_tl, cfg, [(0, rows)])
        for i, (f, g) in enumerate(((student, grad_s), (teacher, grad_t))):
            if g is None:
                continue
            f, g = f[lo:hi], g[lo:hi]
            _attention_grad[(rows, grid_hw)](f, g, maps[i, lo:hi], maps[1 - i, lo:hi], coef[lo:hi], i,
                                             f.shape[1], hw, f.stride(0), f.stride(1), _hw_stride(f),
                                             g.stride(0), g.stride(1), _hw_stride(g), p_acc, P_MODE=p_mode,
                                             **blocks)


def forward(student, teacher, mode, p, grad_student, grad_teacher):
    """(losses, d loss_i/d student_i, d loss_i/d teacher_i) as rkd_fast::feature_distance_fwd defines them.

    losses is (N,) float32 (float64 for float64 inputs); a gradient is `empty_like` its input (same strides)
    in the input's dtype when asked for, else an empty (0,) tensor."""
    _check(student, teacher, mode, p)
    acc, acc_tl = _acc_dtypes(student.dtype)
    n = student.shape[0]
    losses = student.new_empty((n,), dtype=acc)
    grad_s = torch.empty_like(student) if grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if n == 0:
        return losses, grad_s, grad_t
    cfg = _config(student.device)
    bytes_per_sample = (student[0].numel() + teacher[0].numel()) * student.element_size()
    groups = _groups(n, bytes_per_sample, cfg, grad_student or grad_teacher)
    coef = torch.empty((n, 4), dtype=acc, device=student.device)
    # launches go to the inputs' device (and its current stream), whatever the current device is
    with torch.cuda.device(student.device) if student.device.type == "cuda" else contextlib.nullcontext():
        if mode == ATTENTION:
            _attention(student, teacher, float(p), losses, coef, grad_s if grad_student else None,
                       grad_t if grad_teacher else None, acc, acc_tl, cfg, groups)
        else:
            size = student[0].numel()
            _pair_stats_and_grad(student, teacher, losses, coef, grad_s if grad_student else None,
                                 grad_t if grad_teacher else None, mode, size, acc_tl, cfg, groups)
    return losses, grad_s, grad_t
