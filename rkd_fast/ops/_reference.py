"""Pure PyTorch definitions of every op: the oracle the tests compare kernels against, and the fallback when no
kernel serves a device. Written for clarity, not speed. Each computes in float32 (float64 for float64 inputs)
and returns per-sample losses reduced as asked (float32; float64 when an input is float64); autograd gives
the gradients, in each input's dtype."""

import math

import torch

NORM_EPS = 1e-12  # the floor of ‖x‖ in the normalisations, as in torch.nn.functional.normalize


def accumulation_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce(losses, reduction):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _row_scale(x):
    """Per row of x (N, K): its largest magnitude where that is finite and above 1, else 1. Rows are divided by it
    before anything is squared: squares of values above ~1.8e19 overflow float32 (and torch.linalg.vector_norm
    does not scale on CPU), while the distances below do not change when a row is scaled (its norm floor with it)."""
    if x.shape[1] == 0:
        return x.new_ones((x.shape[0], 1))
    largest = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(torch.isfinite(largest) & (largest > 1), largest, 1.0)


def _normalize_rows(x, floor=NORM_EPS):
    """x / max(‖x‖, floor) per row, floor a number or one per row."""
    scale = _row_scale(x)
    x = x / scale
    return x / x.norm(dim=1, keepdim=True).clamp_min(floor / scale)


def attention_map(features, p):
    """Σ_c |F[c]|^p over channels of (N, C, H, W) features, flattened to (N, H·W) and L2-normalised. |F|^p gets
    the subgradient 0 at F = 0 (for p < 1 it has no derivative there: ReLU features would give NaN). The features
    are divided by their largest magnitude first (see _row_scale): the maps scale by its p-th power, their norm
    floor with them."""
    scale = _row_scale(features.flatten(1)).view(-1, 1, 1, 1)
    f = (features / scale).abs()
    a = torch.where(f == 0, 0.0, f).pow(p).sum(dim=1).flatten(1)  # where: no p·0^(p-1) = inf in the backward
    return _normalize_rows(a, NORM_EPS / scale.view(-1, 1) ** p)


def feature_distance(student, teacher, mode="normalized", p=2.0, reduction="mean"):
    acc = accumulation_dtype(student, teacher)
    s, t = student.to(acc), teacher.to(acc)
    rows = (s.shape[0], math.prod(s.shape[1:]))  # (N, K), also for N = 0, where reshape(N, -1) is ambiguous
    if mode == "mse":
        diff = (s - t).reshape(rows)
        scale = _row_scale(diff)  # mean(d²) as mean((d / c)·d)·c: neither it nor its backward squares a large d
        losses = ((diff / scale) * diff).mean(dim=1) * scale[:, 0]
    elif mode == "normalized":
        diff = _normalize_rows(s.reshape(rows)) - _normalize_rows(t.reshape(rows))
        losses = diff.pow(2).sum(dim=1)
    elif mode == "attention":
        losses = (attention_map(s, p) - attention_map(t, p)).pow(2).sum(dim=1)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return reduce(losses, reduction)


def fd_jacobian(s_clean, s_pert, h, t_clean=None, t_pert=None, on="logits", temperature=1.0, reduction="mean"):
    """Finite-difference Jacobian term. g = identity (on="logits") or softmax(·/temperature) (on="probs");
    per sample ‖(g(s_pert) - g(s_clean))/h - (g(t_pert) - g(t_clean))/h‖² with a teacher, and
    ‖(g(s_pert) - g(s_clean))/h‖² without. The teacher is a constant (detached); h is a number or a tensor
    of shape () or (N,), and receives a gradient when it requires one."""
    acc = accumulation_dtype(s_clean, s_pert, t_clean, t_pert)

    def g(x):
        x = x.to(acc)
        return x if on == "logits" else torch.softmax(x / temperature, dim=1)

    if on not in ("logits", "probs"):
        raise ValueError(f"unknown on {on!r}")
    h = h.to(acc) if isinstance(h, torch.Tensor) else torch.tensor(h, dtype=acc, device=s_clean.device)
    h = h.reshape(-1, 1) if h.dim() == 1 else h
    diff = (g(s_pert) - g(s_clean)) / h
    if t_clean is not None:
        diff = diff - (g(t_pert.detach()) - g(t_clean.detach())) / h
    return reduce(diff.pow(2).sum(dim=1), reduction)
