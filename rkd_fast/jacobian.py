"""rkd_fast.jacobian_penalty: the input-Jacobian term of robust distillation at the model level.

One random (or gradient) direction ``d`` per sample, two forward passes of the student (at ``x`` and at
``x + h·d``) and, with a teacher, two of the teacher under ``torch.no_grad()``; the fused op
``rkd_fast.fd_jacobian_loss`` turns the four outputs into ``‖(S(x+hd) - S(x))/h - (T(x+hd) - T(x))/h‖²`` per
sample, a finite-difference estimate of ``‖J_S·d - J_T·d‖²`` (``‖J_S·d‖²`` without a teacher).
``estimator="exact"`` computes ``J·d`` by double backprop instead: the accuracy reference and the speed baseline.

BatchNorm and dropout in train mode: the perturbed pass reuses the clean pass's batch statistics and dropout
masks (`rkd_fast.clean_pass`), in two calls, or in one batched call ``model(cat([x, x + h·d]))`` after
``share_clean_statistics(model)`` (which also makes the term work under ``torch.compile``; the trainer converts
the student when it compiles it). The batched path is taken whenever the student's modules have been converted
(and the direction does not need the clean pass first); it is also one larger forward instead of two smaller
ones on a GPU.

Default step (``h=None``): measured on the digits CNN, see docs/jacobian_accuracy.md and
``python -m rkd_fast.bench.jacobian_accuracy``. The step scales with the input's RMS, so a per-pixel move is a
fixed fraction of a typical pixel whatever the data's range. Under bfloat16 autocast no step is accurate
(a step large enough to rise above bfloat16 rounding is far outside the linear regime), so with ``h=None`` the
student and teacher passes of the term run in float32 (autocast off inside the call): the cost is that of
float32 forward and backward passes of both models in that step instead of bfloat16 ones.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from . import seeding
from .clean_pass import CleanPassState, clean_rows, shares_clean_statistics
from .ops._dispatch import REDUCTIONS, check_choice, is_number
from .ops.fd_jacobian import ON, fd_jacobian_loss

DIRECTIONS = ("rademacher", "gaussian", "grad")
NORMS = ("l2", "linf")
ESTIMATORS = ("fd", "exact")  # how J·d is computed: finite difference, or double backprop

# Default per-pixel step as a multiple of the input's RMS, per compute dtype (docs/jacobian_accuracy.md). For
# norm="l2" (unit-norm d, so a per-pixel move of about h/sqrt(D)) the step is this times RMS·sqrt(D); for
# norm="linf" (d = ±1, h is the per-pixel step) it is this times RMS.
STEP_PER_PIXEL = {torch.float64: 1e-6, torch.float32: 3e-4, torch.float16: 1e-2}
# Compute dtypes with no accurate step: with h=None the term's passes run in this dtype instead.
HIGHER_PRECISION = {torch.bfloat16: torch.float32}
_NORM_EPS = 1e-12


def compute_dtype(x):
    """The dtype the model's matmuls and convolutions run in for input ``x``: the autocast dtype when autocast
    is on for ``x``'s device (it casts float32 inputs only), otherwise ``x.dtype``."""
    device_type = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def default_step(x, norm="l2", dtype=None):
    """The default h for input ``x``: ``STEP_PER_PIXEL[dtype] · RMS(x)``, times ``sqrt(D)`` (D = elements per
    sample) for norm="l2". Returns a 0-d float32 tensor on ``x``'s device (no host synchronisation).

    ``dtype`` is the compute dtype (default: ``compute_dtype(x)``); bfloat16 has no accurate step (see
    ``HIGHER_PRECISION``) and raises ValueError here."""
    check_choice("norm", norm, NORMS)
    dtype = compute_dtype(x) if dtype is None else dtype
    if dtype not in STEP_PER_PIXEL:
        raise ValueError(f"no accurate finite-difference step is known for {dtype} (measured in "
                         f"docs/jacobian_accuracy.md); run the passes in float32")
    rms = x.detach().float().square().mean().sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))  # an all-zero batch: unit scale
    per_sample = x[0].numel()
    return STEP_PER_PIXEL[dtype] * rms * (math.sqrt(per_sample) if norm == "l2" else 1.0)


def draw_direction(x, direction="rademacher", norm="l2", grad=None, generator=None):
    """One direction per sample of ``x`` (N, ...), in ``x``'s dtype, drawn from `generator` (torch's global one
    when None; per sample of a global batch inside a training step, `rkd_fast.seeding`).

    - ``"rademacher"``: independent ±1 entries; ``"gaussian"``: independent N(0, 1) entries;
      ``"grad"``: ``grad`` (an input gradient, the shape of ``x``).
    - ``norm="l2"``: scaled to unit L2 norm per sample (a zero gradient stays zero);
      ``norm="linf"``: its sign pattern (entries ±1, 0 where the gradient is 0), so ``h`` is the per-pixel step.
      Under "linf", "gaussian" and "rademacher" give the same distribution.
    """
    check_choice("direction", direction, DIRECTIONS)
    check_choice("norm", norm, NORMS)
    if direction == "grad":
        if grad is None or grad.shape != x.shape:
            raise ValueError("direction='grad' needs the input gradient, of the shape of x")
        raw = grad.detach()
    elif direction == "rademacher":
        raw = seeding.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype).mul_(2).sub_(1)
    else:
        raw = seeding.normal(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if norm == "linf":
        return raw.sign().to(x.dtype)
    flat = raw.float().flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return flat.view(x.shape).to(x.dtype)


def check_options(**options):
    """ValueError for a bad value among jacobian_penalty's options (h, direction, norm, on, temperature, fraction,
    estimator); the options not given are not checked. RobustKDLoss and the trainer check theirs with this when they
    are read, before any step runs."""
    choices = {"direction": DIRECTIONS, "norm": NORMS, "on": ON, "estimator": ESTIMATORS}
    for name, value in options.items():
        if name in choices:
            check_choice(name, value, choices[name])
        elif name == "h":
            if value is not None and (not is_number(value) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"h must be None or a finite number > 0, got {value!r}")
        elif name == "fraction":
            if not is_number(value) or not 0 < value <= 1:  # NaN fails both comparisons
                raise ValueError(f"fraction must be a number in (0, 1], got {value!r}")
        elif name == "temperature":
            if not is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        else:
            raise TypeError(f"unknown jacobian_penalty option {name!r}")


def _check(student, x, y, teacher, h, direction, norm, on, temperature, fraction, reduction, estimator):
    if not callable(student):
        raise TypeError(f"student must be a module or callable, got {type(student).__name__}")
    if teacher is not None and not callable(teacher):
        raise TypeError(f"teacher must be a module, a callable or None, got {type(teacher).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_options(h=h, direction=direction, norm=norm, on=on, temperature=temperature, fraction=fraction,
                  estimator=estimator)
    if direction == "grad":
        if y is None:
            raise ValueError("direction='grad' needs the labels y (the direction is the input gradient of the "
                             "cross-entropy at y)")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
            raise ValueError(f"y must be an int64 tensor of shape (N,) = ({x.shape[0]},), got "
                             f"{getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")


def _check_outputs(s_clean, t_clean, n):
    for name, out in (("student", s_clean), ("teacher", t_clean)):
        if out is not None and (not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n):
            raise ValueError(f"the {name} must return logits of shape (N, K) = ({n}, K), got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if t_clean is not None and t_clean.shape[1] != s_clean.shape[1]:
        raise ValueError(f"student and teacher class counts differ: student K = {s_clean.shape[1]}, "
                         f"teacher K = {t_clean.shape[1]}")


def _input_grad_of_ce(logits, y, x_in, retain_graph):
    """d CE(logits, y) / d x_in, without create_graph (the direction is a constant)."""
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_in, retain_graph=retain_graph)
    return grad


def _jvp(out, x_in, d, on, temperature, create_graph):
    """J·d of out (or of softmax(out/T) for on="probs") w.r.t. x_in, by double backprop: v ↦ vᵀJ is linear in
    v, so the gradient of ⟨vᵀJ, d⟩ w.r.t. v is J·d. create_graph=True keeps it differentiable (student)."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    out = out.to(acc)
    if on == "probs":
        out = torch.softmax(out / temperature, dim=1)
    v = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, x_in, grad_outputs=v, create_graph=True)
    (jd,) = torch.autograd.grad(vjp, v, grad_outputs=d.to(vjp.dtype), create_graph=create_graph)
    return jd


def jacobian_penalty(student, x, y=None, *, teacher=None, h=None, direction="rademacher", norm="l2", on="logits",
                     temperature=1.0, fraction=1.0, reduction="mean", estimator="fd", return_outputs=False,
                     generator=None):
    """Input-Jacobian penalty (no teacher) or Jacobian matching (with a teacher) along one direction per sample.

    Per selected sample ``i``, with ``g`` the identity (``on="logits"``) or ``softmax(· / temperature)``
    (``on="probs"``) and ``d_i`` its direction:
    ``‖J_{g∘S}(x_i)·d_i - J_{g∘T}(x_i)·d_i‖²`` (without a teacher ``‖J_{g∘S}(x_i)·d_i‖²``),
    estimated by ``estimator="fd"`` as ``‖(g(S(x_i+h·d_i)) - g(S(x_i)))/h - (g(T(x_i+h·d_i)) - g(T(x_i)))/h‖²`` through
    ``rkd_fast.fd_jacobian_loss``, and computed by ``estimator="exact"`` with double backprop in float32 (autocast
    off), differentiable w.r.t. the student's parameters.

    Args:
        student: the model being trained; returns logits ``(N, K)`` for inputs ``x``.
        x: floating input batch ``(N, ...)``. ``x + h·d`` is not clamped to the data range.
        y: int64 labels ``(N,)``; needed by ``direction="grad"`` only.
        teacher: a frozen model returning ``(N, K)`` logits, or None. It runs under ``torch.no_grad()``, except
            for the input-gradient passes of ``direction="grad"`` and ``estimator="exact"``, which differentiate
            w.r.t. the input only: its parameters never receive gradients.
        h: the step, a number > 0; for ``norm="linf"`` it is the per-pixel step. None: the default for the
            compute dtype (float32, or the autocast dtype) and the input's RMS (``default_step``). Under
            bfloat16 autocast no step is accurate, so with ``h=None`` the term's passes run in float32.
        direction: ``"rademacher"``, ``"gaussian"``, or ``"grad"``: the input gradient of the cross-entropy at
            ``y`` of the teacher (of the student without a teacher), taken without create_graph.
        norm: ``"l2"``: d has unit L2 norm per sample; ``"linf"``: d is a ±1 sign pattern (see draw_direction).
        fraction: in (0, 1]: the term is computed on a random subset of ``k = max(1, round(fraction·N))``
            samples (the perturbed passes run on those only). ``reduction="mean"`` is the mean over the k, and
            ``"sum"`` is ``N/k`` times their sum: both estimate the full-batch value without bias. ``"none"``
            returns N values: the selected samples' losses times ``N/k`` and 0 elsewhere, so that its
            ``.mean()`` and ``.sum()`` equal the other two reductions.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        estimator: ``"fd"`` (finite difference, fused op) or ``"exact"`` (double backprop).
        return_outputs: also return the clean logits of the whole batch, so a caller's CE and KD terms need
            no further forward pass.

    Returns:
        The loss (float32, float64 for float64 inputs), or ``(loss, student_logits, teacher_logits)`` with
        ``return_outputs=True`` (``teacher_logits`` is None without a teacher, and carries no graph).

    BatchNorm layers that normalise with batch statistics (train mode) are updated by the clean pass only; the
    perturbed pass reuses the clean pass's batch statistics and dropout masks (`rkd_fast.clean_pass`). Randomness
    (the subset and the directions) comes from `generator` (a torch.Generator on x's device; None: torch's global
    generator).
    """
    _check(student, x, y, teacher, h, direction, norm, on, temperature, fraction, reduction, estimator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n = x.shape[0]
    k = max(1, min(n, round(fraction * n)))
    dtype = compute_dtype(x)
    precision = contextlib.nullcontext()
    if estimator == "exact" or (h is None and dtype in HIGHER_PRECISION):
        # The exact reference runs in float32; a dtype with no accurate step runs the difference in float32.
        precision = torch.autocast(x.device.type, enabled=False)
        dtype = x.dtype
    with precision:
        loss_rows, s_clean, t_clean = _penalty(student, teacher, x, y, h, k, dtype, direction, norm, on,
                                               temperature, estimator, generator)
    loss = _reduce(loss_rows, n, reduction)
    return (loss, s_clean, t_clean) if return_outputs else loss


def _penalty(student, teacher, x, y, h, k, dtype, direction, norm, on, temperature, estimator, generator):
    """(per-sample losses of the k selected samples with their indices, clean student logits, clean teacher
    logits)."""
    n = x.shape[0]
    idx = None if k == n else torch.randperm(n, device=x.device, generator=generator)[:k]
    pick = (lambda t: t) if idx is None else (lambda t: t[idx])
    exact = estimator == "exact"
    grad_mode = torch.is_grad_enabled()
    student_grad_dir = direction == "grad" and teacher is None
    # A student whose BatchNorms share clean statistics makes its clean and perturbed passes in one call, after
    # the direction is drawn (module docstring); the student's own grad direction needs its clean pass first.
    batched = not exact and not student_grad_dir and shares_clean_statistics(student)
    s_stats = None if batched else CleanPassState(student)
    t_stats = CleanPassState(teacher) if teacher is not None else None

    # Clean passes over the whole batch. The input needs a gradient for the grad direction, and for the exact
    # estimator when the clean pass can serve as the differentiated one (whole batch, no batch statistics).
    reuse_s = exact and idx is None and not s_stats.modules
    reuse_t = exact and teacher is not None and idx is None and not t_stats.modules
    x_s = x.detach().requires_grad_() if (reuse_s or student_grad_dir) and not x.requires_grad else x
    s_clean = None
    if not batched:
        with torch.set_grad_enabled(grad_mode or reuse_s or student_grad_dir), s_stats.record():
            s_clean = student(x_s)
    t_clean = t_graph = x_t = None
    if teacher is not None:
        needs_graph = reuse_t or direction == "grad"
        x_t = x.detach().requires_grad_() if needs_graph else x
        with torch.set_grad_enabled(needs_graph), t_stats.record():
            t_graph = teacher(x_t)
        t_clean = t_graph.detach()
    if not batched:
        _check_outputs(s_clean, t_clean, n)

    grad = None
    if direction == "grad":
        with torch.enable_grad():
            if teacher is None:
                grad = _input_grad_of_ce(s_clean, y, x_s, retain_graph=True)
            else:
                grad = _input_grad_of_ce(t_graph, y, x_t, retain_graph=reuse_t)
        grad = pick(grad)
    xs = pick(x)
    d = draw_direction(xs, direction, norm, grad=grad, generator=generator)

    if exact:
        jd_s = _exact_jvp(student, s_stats, idx, s_clean if reuse_s else None, x_s if reuse_s else xs, d, on,
                          temperature, create_graph=grad_mode)
        jd_t = None
        if teacher is not None:
            jd_t = _exact_jvp(teacher, t_stats, idx, t_graph if reuse_t else None, x_t if reuse_t else xs, d, on,
                              temperature, create_graph=False)
        zeros = torch.zeros_like(jd_s)
        with torch.set_grad_enabled(grad_mode):
            rows = fd_jacobian_loss(zeros, jd_s, 1.0, t_clean=None if jd_t is None else zeros, t_pert=jd_t,
                                    on="logits", reduction="none")
    else:
        step = h if h is not None else default_step(x, norm, dtype)
        x_pert = xs + step * d
        if batched:
            with clean_rows(student, n, idx):
                out = student(torch.cat([x, x_pert]))
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n + xs.shape[0]:
                raise ValueError(f"the student must return logits of shape (N, K) = ({n + xs.shape[0]}, K) for the "
                                 f"batched clean and perturbed inputs, got "
                                 f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            s_clean, s_pert = out[:n], out[n:]
            _check_outputs(s_clean, t_clean, n)
        else:
            with s_stats.replay(idx):
                s_pert = student(x_pert)
        t_pert = None
        if teacher is not None:
            with torch.no_grad(), t_stats.replay(idx):
                t_pert = teacher(x_pert)
        rows = fd_jacobian_loss(pick(s_clean), s_pert, step, t_clean=None if t_pert is None else pick(t_clean),
                                t_pert=t_pert, on=on, temperature=temperature, reduction="none")
    if not grad_mode:
        s_clean = s_clean.detach()
    return (rows, idx), s_clean, t_clean


def _exact_jvp(model, stats, idx, out, x_in, d, on, temperature, create_graph):
    """J·d at x_in. `out` is the model's output at x_in when the clean pass can serve; otherwise a pass on x_in
    (the selected samples `idx`) reuses the clean pass's batch statistics and dropout masks, as the perturbed pass
    of "fd" does."""
    with torch.enable_grad():
        if out is None:
            x_in = x_in if x_in.requires_grad else x_in.detach().requires_grad_()
            with stats.replay(idx, fused=False):  # differentiated twice
                out = model(x_in)
        jd = _jvp(out, x_in, d, on, temperature, create_graph)
    return jd if create_graph else jd.detach()


def _reduce(loss_rows, n, reduction):
    rows, idx = loss_rows
    if idx is None:
        return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows
    k = rows.shape[0]
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum() * (n / k)
    # The selected samples' losses scaled by N/k and zeros elsewhere: .mean() and .sum() match the reductions.
    return rows.new_zeros(n).index_put((idx,), rows * (n / k))
