"""Triton kernels of rkd_fast::feature_distance_fwd_triton (same schema and contract as
rkd_fast::feature_distance_fwd, see rkd_fast/ops/feature_distance.py): the reduced loss and the gradients of the
inputs whose flags are set, in one launch that reads each input once.

Grid (sample, chunk). Each program reduces its chunk to partial sums (modes 1, 2: Σx², Σy², Σxy, Σ(x-y)² and
max|x|, max|y|; mode 0: Σ(x-y)² and max|x-y|) and stores them. The program that arrives last at its sample
(counted with an atomic; no program ever waits for another, so none can deadlock, and the interpreter, which runs
the programs one after another, runs the same code) adds the sample's partials in chunk order (so results are
deterministic), forms the loss and the gradient coefficients, and writes the sample's gradient in a second walk
over the sample, which the other programs of the sample have just read: on a GPU, while it is in L2.

Per sample the gradient is linear in the inputs: d loss/d x = ax·x + bx·y, d loss/d y = ay·y + by·x (mode 0:
multiples of x - y). Mode 2 ("attention"): the chunks are blocks of H·W positions; each program builds the maps
a[hw] = Σ_c |F[c, hw]|^p of its block for student and teacher (each through its own strides, so contiguous and
channels_last are read in place) into a scratch (N, 2, H·W) buffer, the pair sums run on the maps, and the last
program reads the maps back for dL/da, chained into dL/dF = dL/da · p|F|^(p-1) sign(F) (0 at F = 0 for every p).

Large values: sums that are not finite while max|x| is means the squares overflowed; the last program then redoes
the sample on x/max|x| (the distances are scale-invariant with the norm floor scaled too, and the gradients
scale back by the same factor), as csrc/cpu does.

Accumulation is in fp32 (fp64 for fp64 inputs), whatever the input dtype. On CPU the kernels run under the
Triton interpreter (TRITON_INTERPRET=1), with smaller blocks so that tests exercise the loops and several
programs per sample.
"""

import contextlib

import torch
import triton
import triton.language as tl

MSE, NORMALIZED, ATTENTION = 0, 1, 2
MEAN, SUM, NONE = 0, 1, 2  # reductions, as _dispatch.REDUCTIONS orders them
NORM_EPS = 1e-12  # the floor of ‖x‖, as in torch.nn.functional.normalize and the reference
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PARTIALS = 6  # per (sample, chunk): four sums and two largest magnitudes


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _normalized_pair(xx, yy, xy, dd, eps_x, eps_y):
    """‖x̂ - ŷ‖² and the coefficients (ax, bx, ay, by) of its gradient from Σx², Σy², Σxy, Σ(x-y)², the norms
    floored at eps_x, eps_y. Written around the larger norm, as csrc/cpu's normalized_pair (2 - 2cos would cancel
    when x̂ ≈ ŷ); below the floor the norm is a constant, so the gradient has no projection term there."""
    norm_x = tl.sqrt(xx)
    norm_y = tl.sqrt(yy)
    dx = tl.where(norm_x < eps_x, eps_x, norm_x)  # where(norm < eps, ...) keeps a NaN norm NaN, as clamp_min
    dy = tl.where(norm_y < eps_y, eps_y, norm_y)
    k = 1.0 / dx - 1.0 / dy
    loss = tl.where(dx >= dy, dd / (dx * dx) + 2.0 * k * (xy - yy) / dx + k * k * yy,
                    dd / (dy * dy) + 2.0 * k * (xx - xy) / dy + k * k * xx)
    loss = tl.where(loss < 0.0, 0.0, loss)  # a squared distance: no rounding below 0 (NaN stays NaN)
    cross = xy / (dx * dy)
    xr = tl.where(norm_x > eps_x, 2.0 * (xx / (dx * dx) - cross), 0.0)
    yr = tl.where(norm_y > eps_y, 2.0 * (yy / (dy * dy) - cross), 0.0)
    b = -2.0 / (dx * dy)
    return loss, (2.0 - xr) / (dx * dx), b, (2.0 - yr) / (dy * dy), b


@triton.jit
def _add_pair(xx, yy, xy, dd, x, y):
    """The running sums Σx², Σy², Σxy, Σ(x-y)² with the blocks x, y added in (elementwise)."""
    d = x - y
    return xx + x * x, yy + y * y, xy + x * y, dd + d * d


@triton.jit
def _zeros4(BLOCK: tl.constexpr, ACC: tl.constexpr):
    return (tl.zeros([BLOCK], dtype=ACC), tl.zeros([BLOCK], dtype=ACC), tl.zeros([BLOCK], dtype=ACC),
            tl.zeros([BLOCK], dtype=ACC))


@triton.jit
def _sum4(a, b, c, d):
    return tl.sum(a, axis=0), tl.sum(b, axis=0), tl.sum(c, axis=0), tl.sum(d, axis=0)


@triton.jit
def _inverse(largest):
    """1/largest, the scale that brings the largest magnitude to 1 (1 for all zeros)."""
    return 1.0 / tl.where(largest > 0.0, largest, 1.0)


@triton.jit
def _sample_partials(part_ptr, n, n_chunks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The sample's partials (written by its programs) added in chunk order: (Σ0, Σ1, Σ2, Σ3, max4, max5)."""
    row = part_ptr + n.to(tl.int64) * n_chunks * 6
    offs = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], dtype=ACC)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    s3 = tl.zeros([BLOCK], dtype=ACC)
    m4 = tl.zeros([BLOCK], dtype=ACC)
    m5 = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, n_chunks, BLOCK):
        idx = i + offs
        mask = idx < n_chunks
        # volatile: written by other programs, so not to be served from this SM's L1
        s0 += tl.load(row + idx * 6, mask=mask, other=0.0, volatile=True)
        s1 += tl.load(row + idx * 6 + 1, mask=mask, other=0.0, volatile=True)
        s2 += tl.load(row + idx * 6 + 2, mask=mask, other=0.0, volatile=True)
        s3 += tl.load(row + idx * 6 + 3, mask=mask, other=0.0, volatile=True)
        m4 = tl.maximum(m4, tl.load(row + idx * 6 + 4, mask=mask, other=0.0, volatile=True))
        m5 = tl.maximum(m5, tl.load(row + idx * 6 + 5, mask=mask, other=0.0, volatile=True))
    return (tl.sum(s0, axis=0), tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(s3, axis=0), tl.max(m4, axis=0),
            tl.max(m5, axis=0))


@triton.jit
def _sample_scales(part_ptr, n, n_chunks, ACC: tl.constexpr):
    """The sample's sums (Σ0..Σ3), its two inputs' scales, and whether the sums overflowed while the inputs are
    finite: then the scales are 1/max|·| and the caller recomputes the sums on the scaled inputs; else they are 1."""
    s0, s1, s2, s3, m0, m1 = _sample_partials(part_ptr, n, n_chunks, ACC, 64)
    overflowed = ((_finite(s0) & _finite(s1) & _finite(s2) & _finite(s3)) == 0) & _finite(m0) & _finite(m1)
    one = tl.full([], 1.0, ACC)
    return s0, s1, s2, s3, tl.where(overflowed, _inverse(m0), one), tl.where(overflowed, _inverse(m1), one), overflowed


@triton.jit
def _store_partials(part_ptr, n, c, n_chunks, s0, s1, s2, s3, m4, m5):
    out = part_ptr + (n.to(tl.int64) * n_chunks + c) * 6
    tl.store(out, s0)
    tl.store(out + 1, s1)
    tl.store(out + 2, s2)
    tl.store(out + 3, s3)
    tl.store(out + 4, m4)
    tl.store(out + 5, m5)


@triton.jit
def _arrived_last(count_ptr, n, n_chunks):
    """True in the program that completes sample n: its partials, stored before, are then visible to it."""
    tl.debug_barrier()  # every thread's stores of this program before the release below
    return tl.atomic_add(count_ptr + n, 1, sem="acq_rel") == n_chunks - 1


# --------------------------------------------------------------------------------------------- modes 0 and 1


@triton.jit
def _flat_fused(x_ptr, y_ptr, gx_ptr, gy_ptr, part_ptr, count_ptr, loss_ptr, params_ptr, D, chunk, n_chunks,
                MODE: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, ACC: tl.constexpr,
                EPS: tl.constexpr, BLOCK: tl.constexpr):
    """Sample n is the flat block [n*D, (n+1)*D) of x and y; this program reduces [c*chunk, (c+1)*chunk) of it."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    base = n.to(tl.int64) * D
    start = c.to(tl.int64) * chunk
    offs = tl.arange(0, BLOCK)
    xx, yy, xy, dd = _zeros4(BLOCK, ACC)
    mx = tl.zeros([BLOCK], dtype=ACC)
    my = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, chunk, BLOCK):
        idx = start + i + offs
        mask = idx < D
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        if MODE == 0:
            diff = x - y
            dd += diff * diff
            mx = tl.maximum(mx, tl.abs(diff))
        else:
            xx, yy, xy, dd = _add_pair(xx, yy, xy, dd, x, y)
            mx = tl.maximum(mx, tl.abs(x))
            my = tl.maximum(my, tl.abs(y))
    xx, yy, xy, dd = _sum4(xx, yy, xy, dd)
    _store_partials(part_ptr, n, c, n_chunks, xx, yy, xy, dd, tl.max(mx, axis=0), tl.max(my, axis=0))
    if _arrived_last(count_ptr, n, n_chunks):
        _flat_finish(x_ptr, y_ptr, gx_ptr, gy_ptr, part_ptr, loss_ptr, params_ptr, n, base, D, n_chunks, MODE,
                     GRAD_X, GRAD_Y, ACC, EPS, BLOCK)


@triton.jit
def _flat_finish(x_ptr, y_ptr, gx_ptr, gy_ptr, part_ptr, loss_ptr, params_ptr, n, base, D, n_chunks,
                 MODE: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, ACC: tl.constexpr,
                 EPS: tl.constexpr, BLOCK: tl.constexpr):
    weight = tl.load(params_ptr + 1)  # the sample's weight in the reduced loss: 1/N for the mean
    # sx, sy: the scales of x and y (of x - y in mode 0), 1 unless the squares overflowed
    xx, yy, xy, dd, sx, sy, overflowed = _sample_scales(part_ptr, n, n_chunks, ACC)
    offs = tl.arange(0, BLOCK)
    if overflowed:
        xx_v, yy_v, xy_v, dd_v = _zeros4(BLOCK, ACC)
        for i in range(0, D, BLOCK):
            idx = i + offs
            mask = idx < D
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC)
            if MODE == 0:  # of x - y: the loss needs its sum alone
                xx_v, yy_v, xy_v, dd_v = _add_pair(xx_v, yy_v, xy_v, dd_v, (x - y) * sx, 0.0)
            else:
                xx_v, yy_v, xy_v, dd_v = _add_pair(xx_v, yy_v, xy_v, dd_v, x * sx, y * sy)
        xx, yy, xy, dd = _sum4(xx_v, yy_v, xy_v, dd_v)
    if MODE == 0:
        size = tl.full([], 1.0, ACC) * D  # D = 0 gives 0/0 = NaN, the mean of nothing
        largest = 1.0 / sx
        tl.store(loss_ptr + n, ((dd / size) * largest) * largest)  # mean((d·sx)²)/sx², no square overflowing
        ax = 2.0 * weight / size
        bx = -ax
        ay = ax
        by = -ax
        sx = tl.full([], 1.0, ACC)  # the gradient 2(x - y)/D does not overflow: no scaling below
        sy = tl.full([], 1.0, ACC)
    else:
        loss, ax, bx, ay, by = _normalized_pair(xx, yy, xy, dd, EPS * sx, EPS * sy)
        tl.store(loss_ptr + n, loss)
        ax *= weight
        bx *= weight
        ay *= weight
        by *= weight
    if GRAD_X or GRAD_Y:
        for i in range(0, D, BLOCK):
            idx = i + offs
            mask = idx < D
            x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(ACC) * sx
            y = tl.load(y_ptr + base + idx, mask=mask, other=0.0).to(ACC) * sy
            if MODE == 0:  # the difference first: exact when x and y are close
                diff = x - y
                gx = diff * ax
                gy = diff * by
            else:  # d loss / dx = sx · d loss / d(sx x)
                gx = (ax * x + bx * y) * sx
                gy = (ay * y + by * x) * sy
            if GRAD_X:
                tl.store(gx_ptr + base + idx, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            if GRAD_Y:
                tl.store(gy_ptr + base + idx, gy.to(gy_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- mode 2


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
    """d|v|^p / dv = p |v|^(p-1) sign(v), and 0 at v = 0 for every p: for p < 1 |v|^p has no derivative there,
    and 0, the subgradient, keeps ReLU features (exact zeros) from giving p · inf · 0 = NaN."""
    if P_MODE == 2:
        out = 2.0 * v
    else:
        sign = tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, v * 0.0))  # v * 0 keeps NaN as NaN
        if P_MODE == 1:
            out = sign
        else:
            a = tl.abs(v)
            mag = p * tl.exp2((p - 1.0) * tl.log2(tl.where(a == 0.0, 1.0, a)))  # log2(0) never evaluated
            out = mag * sign  # sign(0) = 0
    return out


@triton.jit
def _map_block(f_ptr, C, stride_c, stride_hw, hw, hw_mask, scale, p, P_MODE: tl.constexpr, ACC: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(a[hw] = Σ_c |scale·F[c, hw]|^p, max_c |F[c, hw]|) over one block of hw positions of one sample."""
    cs = tl.arange(0, BLOCK_C)
    hw_off = hw.to(tl.int64)[None, :] * stride_hw
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    largest = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c < C)[:, None] & hw_mask[None, :]
        v = tl.load(f_ptr + c.to(tl.int64)[:, None] * stride_c + hw_off, mask=mask, other=0.0).to(ACC)
        acc += _abs_pow(v * scale, p, P_MODE)
        largest = tl.maximum(largest, tl.abs(v))
    return tl.sum(acc, axis=0), tl.max(tl.max(largest, axis=0), axis=0)


@triton.jit
def _grad_block(f_ptr, g_ptr, C, stride_c, stride_hw, g_stride_c, g_stride_hw, hw, hw_mask, grad_a, scale, p,
                P_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad[c, hw] = scale · grad_a[hw] · d|F'|^p/dF' at F' = scale·F[c, hw], over one block of hw."""
    cs = tl.arange(0, BLOCK_C)
    hw64 = hw.to(tl.int64)[None, :]
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + cs).to(tl.int64)[:, None]
        mask = (c < C) & hw_mask[None, :]
        v = tl.load(f_ptr + c * stride_c + hw64 * stride_hw, mask=mask, other=0.0).to(ACC)
        grad = grad_a[None, :] * _abs_pow_grad(v * scale, p, P_MODE) * scale
        tl.store(g_ptr + c * g_stride_c + hw64 * g_stride_hw, grad.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_fused(s_ptr, t_ptr, gs_ptr, gt_ptr, map_ptr, part_ptr, count_ptr, loss_ptr, params_ptr, Cs, Ct, HW,
                     s_sn, s_sc, s_shw, t_sn, t_sc, t_shw, gs_sn, gs_sc, gs_shw, gt_sn, gt_sc, gt_shw, n_chunks,
                     P_MODE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr,
                     EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Element (c, hw) of sample n of the student is at n*s_sn + c*s_sc + hw*s_shw (contiguous: s_shw = 1;
    channels_last: s_sc = 1), likewise for the teacher and the gradients; this program takes hw block c."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    p = tl.load(params_ptr)  # in ACC: a float argument would reach the kernel as fp32
    one = tl.full([], 1.0, ACC)
    hw = c * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    s_base = s_ptr + n.to(tl.int64) * s_sn
    t_base = t_ptr + n.to(tl.int64) * t_sn
    a_s, m_s = _map_block(s_base, Cs, s_sc, s_shw, hw, hw_mask, one, p, P_MODE, ACC, BLOCK_C, BLOCK_HW)
    a_t, m_t = _map_block(t_base, Ct, t_sc, t_shw, hw, hw_mask, one, p, P_MODE, ACC, BLOCK_C, BLOCK_HW)
    maps = map_ptr + n.to(tl.int64) * 2 * HW
    tl.store(maps + hw, a_s, mask=hw_mask)
    tl.store(maps + HW + hw, a_t, mask=hw_mask)
    xx, yy, xy, dd = _add_pair(0.0, 0.0, 0.0, 0.0, a_s, a_t)
    xx, yy, xy, dd = _sum4(xx, yy, xy, dd)
    _store_partials(part_ptr, n, c, n_chunks, xx, yy, xy, dd, m_s, m_t)
    if _arrived_last(count_ptr, n, n_chunks):
        _attention_finish(s_base, t_base, gs_ptr + n.to(tl.int64) * gs_sn, gt_ptr + n.to(tl.int64) * gt_sn, maps,
                          part_ptr, loss_ptr, params_ptr, n, Cs, Ct, HW, s_sc, s_shw, t_sc, t_shw, gs_sc, gs_shw,
                          gt_sc, gt_shw, n_chunks, p, P_MODE, GRAD_S, GRAD_T, ACC, EPS, BLOCK_C, BLOCK_HW)


@triton.jit
def _attention_finish(s_base, t_base, gs_base, gt_base, maps, part_ptr, loss_ptr, params_ptr, n, Cs, Ct, HW, s_sc,
                      s_shw, t_sc, t_shw, gs_sc, gs_shw, gt_sc, gt_shw, n_chunks, p, P_MODE: tl.constexpr,
                      GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    weight = tl.load(params_ptr + 1)
    # ss, st: the scales of the student and teacher features, 1 unless the maps or their squares overflowed
    xx, yy, xy, dd, ss, st, overflowed = _sample_scales(part_ptr, n, n_chunks, ACC)
    offs = tl.arange(0, BLOCK_HW)
    if overflowed:  # the maps again, of F/max|F|
        xx_v, yy_v, xy_v, dd_v = _zeros4(BLOCK_HW, ACC)
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + offs
            hw_mask = hw < HW
            a_s, _ = _map_block(s_base, Cs, s_sc, s_shw, hw, hw_mask, ss, p, P_MODE, ACC, BLOCK_C, BLOCK_HW)
            a_t, _ = _map_block(t_base, Ct, t_sc, t_shw, hw, hw_mask, st, p, P_MODE, ACC, BLOCK_C, BLOCK_HW)
            tl.store(maps + hw, a_s, mask=hw_mask)
            tl.store(maps + HW + hw, a_t, mask=hw_mask)
            xx_v, yy_v, xy_v, dd_v = _add_pair(xx_v, yy_v, xy_v, dd_v, a_s, a_t)
        xx, yy, xy, dd = _sum4(xx_v, yy_v, xy_v, dd_v)
    # the maps scale by ss^p and st^p, and so do their norm floors
    loss, ax, bx, ay, by = _normalized_pair(xx, yy, xy, dd, EPS * _abs_pow(ss, p, P_MODE),
                                            EPS * _abs_pow(st, p, P_MODE))
    tl.store(loss_ptr + n, loss)
    if GRAD_S or GRAD_T:
        for h0 in range(0, HW, BLOCK_HW):
            hw = h0 + offs
            hw_mask = hw < HW
            a_s = tl.load(maps + hw, mask=hw_mask, other=0.0, volatile=True)
            a_t = tl.load(maps + HW + hw, mask=hw_mask, other=0.0, volatile=True)
            if GRAD_S:
                _grad_block(s_base, gs_base, Cs, s_sc, s_shw, gs_sc, gs_shw, hw, hw_mask,
                            weight * (ax * a_s + bx * a_t), ss, p, P_MODE, ACC, BLOCK_C)
            if GRAD_T:
                _grad_block(t_base, gt_base, Ct, t_sc, t_shw, gt_sc, gt_shw, hw, hw_mask,
                            weight * (ay * a_t + by * a_s), st, p, P_MODE, ACC, BLOCK_C)


# --------------------------------------------------------------------------------------------- launch


def _config(device):
    """Block sizes and the number of programs to aim for. Under the interpreter each program is a Python
    call, so few programs and small blocks (which still exercise the loops and several programs per sample)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"block": 1024, "block_c": 32, "block_hw": 64, "programs": 8 * props.multi_processor_count,
                "num_warps": 8}
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


def _check(student, teacher, mode, p, reduction):
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
    if reduction not in (MEAN, SUM, NONE):
        raise ValueError(f"reduction must be 0 (mean), 1 (sum) or 2 (none), got {reduction!r}")
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


def _chunks(size, rows, block, cfg):
    """(chunk, n_chunks) for `rows` samples of `size` elements: enough programs to fill the device, chunks a
    multiple of the block and at least one chunk (so that a sample of size 0 still gets its loss written)."""
    wanted = max(1, -(-cfg["programs"] // max(rows, 1)))
    n_chunks = max(1, min(wanted, triton.cdiv(size, block)))
    chunk = triton.cdiv(triton.cdiv(max(size, 1), n_chunks), block) * block
    return chunk, triton.cdiv(max(size, 1), chunk)


def _device_guard(x):
    """Launches go to the inputs' device (and its current stream), whatever the current device is."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _p_kind(p):
    return 2 if p == 2.0 else 1 if p == 1.0 else 0


def forward(student, teacher, mode, p, reduction, grad_student, grad_teacher):
    """(loss, grad_student, grad_teacher) as rkd_fast::feature_distance_fwd defines them: the per-sample losses
    reduced as asked (float32, float64 for float64 inputs), and for each flag set the gradient of that loss,
    `empty_like` the input (same strides) in its dtype; an empty (0,) tensor otherwise."""
    _check(student, teacher, mode, p, reduction)
    acc, acc_tl = _acc_dtypes(student.dtype)
    n = student.shape[0]
    losses = student.new_empty((n,), dtype=acc)
    grad_s = torch.empty_like(student) if grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if grad_teacher else teacher.new_empty((0,))
    if n > 0:
        cfg = _config(student.device)
        weight = 1.0 / n if reduction == MEAN else 1.0
        params = torch.tensor([float(p), weight], dtype=acc, device=student.device)  # read in ACC precision
        # unused gradient pointers get a valid tensor; the constexpr flags keep the kernels off them
        gs = grad_s if grad_student else student
        gt = grad_t if grad_teacher else teacher
        with _device_guard(student):
            if mode != ATTENTION:
                size = student[0].numel()
                chunk, n_chunks = _chunks(size, n, cfg["block"], cfg)
                partials = student.new_empty((n, n_chunks, _PARTIALS), dtype=acc)
                counts = torch.zeros((n,), dtype=torch.int32, device=student.device)
                _flat_fused[(n, n_chunks)](student, teacher, gs, gt, partials, counts, losses, params, size, chunk,
                                           n_chunks, MODE=mode, GRAD_X=grad_student, GRAD_Y=grad_teacher,
                                           ACC=acc_tl, EPS=NORM_EPS, BLOCK=cfg["block"], num_warps=cfg["num_warps"])
            else:
                hw = student.shape[2] * student.shape[3]
                n_chunks = max(1, triton.cdiv(hw, cfg["block_hw"]))
                partials = student.new_empty((n, n_chunks, _PARTIALS), dtype=acc)
                counts = torch.zeros((n,), dtype=torch.int32, device=student.device)
                maps = student.new_empty((n, 2, hw), dtype=acc)
                _attention_fused[(n, n_chunks)](
                    student, teacher, gs, gt, maps, partials, counts, losses, params, student.shape[1],
                    teacher.shape[1], hw, student.stride(0), student.stride(1), _hw_stride(student), teacher.stride(0),
                    teacher.stride(1), _hw_stride(teacher), gs.stride(0), gs.stride(1), _hw_stride(gs), gt.stride(0),
                    gt.stride(1), _hw_stride(gt), n_chunks, P_MODE=_p_kind(float(p)), GRAD_S=grad_student,
                    GRAD_T=grad_teacher, ACC=acc_tl, EPS=NORM_EPS, BLOCK_C=cfg["block_c"],
                    BLOCK_HW=cfg["block_hw"], num_warps=cfg["num_warps"])
    if reduction == NONE:
        return losses, grad_s, grad_t
    return (losses.mean() if reduction == MEAN else losses.sum()), grad_s, grad_t
