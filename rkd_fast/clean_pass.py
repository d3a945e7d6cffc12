"""What a perturbed forward pass reuses from the clean pass of the same step: BatchNorm batch statistics and
dropout masks, so that ``(S(x + h·d) − S(x)) / h`` measures how the model's function changes along ``d``, not how
its normalisation or its random mask changed between two calls.

BatchNorm in train mode. One batched call ``model(cat([x, x + h·d]))`` would normalise the clean samples with
statistics of a batch half made of perturbed samples (so the clean logits would not be those of a clean
forward) and would update the running statistics from that mixed, doubled batch. Two calls where the perturbed
call normalises with its own batch statistics leave the clean logits intact but update the running statistics
twice, and on a subset (``fraction < 1``) the subset's statistics differ from the full batch's by O(1), so the
difference quotient would measure that change divided by h. So: the clean call is an ordinary forward (it alone
updates the running statistics); the perturbed call normalises every training-mode BatchNorm with the batch
statistics the clean call computed (kept in the graph, so gradients flow through them as in the clean call) and
touches no running statistics. The Jacobian is that of each sample's output at this batch's normalisation,
which is what eval mode gives with the running statistics. (SyncBatchNorm across processes is not supported in
train mode; activation checkpointing inside the model would recompute the perturbed pass with its own
statistics.)

Dropout in train mode. A second call would draw a new mask, and the difference quotient would measure the mask
change divided by h (for a Linear + Dropout(0.5) model, 1e6 against 0.05 in eval mode). The clean call draws
each dropout module's mask explicitly (as ``nn.Dropout`` does: Bernoulli(1 − p) / (1 − p), per element, or per
channel for Dropout1d/2d/3d) and the perturbed call multiplies by the same mask, row for row of the samples it
perturbs. Alpha dropout (a different formula) is refused.

`CleanPassState` does this for two calls (``record()`` around the clean call, ``replay(rows)`` around the
perturbed one). Under ``torch.compile`` hooks added per call are invisible to the compiled graph, so
`share_clean_statistics(model)` puts the same scheme inside each BatchNorm's and dropout module's own forward:
inside `clean_rows(model, n, rows)`, rows ``[0, n)`` of the input are the clean pass and the rest the perturbed
rows ``rows`` of it, so one call ``model(cat([x, x_pert]))`` computes what the two calls do.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from . import seeding

# nn.Dropout masks each element; the others mask whole channels (dims after N, C are broadcast).
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def uses_batch_stats(module):
    # The condition under which _BatchNorm.forward normalises with the batch's own statistics.
    return isinstance(module, _BatchNorm) and (module.training or module.running_mean is None)


def draws_mask(module):
    """A dropout module that zeroes inputs in this pass (train mode, p > 0); alpha dropout is refused."""
    if isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout)) and module.training and module.p > 0:
        raise NotImplementedError(f"jacobian_penalty: {type(module).__name__} in train mode is not supported (its "
                                  "perturbed pass would draw another mask); put the model in eval mode or use "
                                  "nn.Dropout")
    return isinstance(module, _DropoutNd) and module.training and module.p > 0


def _draw_mask(module, x):
    """The mask ``F.dropout`` would multiply `x` by: Bernoulli(1 − p) / (1 − p), per element or per channel."""
    shape = x.shape if not isinstance(module, _CHANNEL_DROPOUT) else x.shape[:2] + (1,) * (x.dim() - 2)
    keep = 1.0 - module.p
    return seeding.bernoulli(shape, keep, device=x.device, dtype=x.dtype).div_(keep)


def _apply_mask(module, mask, x):
    return x.mul_(mask) if module.inplace else x * mask


def _normalize_with(module, stats, fused, x):
    """Batch norm of x with given (mean, biased var), no running-statistics update: x·scale + shift, by the
    batch-norm kernel (fused=True) or by elementwise ops (differentiable twice, for estimator="exact")."""
    if not stats:
        raise RuntimeError("jacobian_penalty: the perturbed pass called a BatchNorm more times than the clean pass; "
                           "the model's control flow must not depend on its input")
    mean, var = stats.pop(0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = module.weight * scale
    shift = -mean * scale
    if module.bias is not None:
        shift = module.bias + shift
    if fused:
        # x·scale + shift by the batch-norm kernel (eval mode, mean 0, var + eps = 1 exactly): one fused pass
        # forward and backward, gradients to scale and shift (so to the statistics); it is not differentiable
        # twice. eps must be > 0 (torch 2.11 refuses 0 on CUDA); 1 − 2⁻²⁰ and 2⁻²⁰ are exact and sum to 1.
        eps = 2.0 ** -20
        return F.batch_norm(x, torch.zeros_like(scale), torch.full_like(scale, 1.0 - eps), scale, shift, False, 0.0,
                            eps)
    return (x * scale.view(shape) + shift.view(shape)).to(x.dtype)


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of (N, C, ...) over every dim but 1, in float32 (float64 for float64).
    torch.var_mean over dims (0, 2, 3) is about 6x slower on CPU than these two passes, and its backward runs
    several passes; here the backward is one fused pass, x·a + b with per-channel a and b (it is itself
    differentiable, built from differentiable ops)."""

    @staticmethod
    def forward(ctx, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dims = [0] + list(range(2, x.dim()))
        xa = x.to(acc)
        mean = xa.mean(dims, keepdim=True)
        var = (xa - mean).square().mean(dims, keepdim=True)  # two passes: no cancellation
        ctx.save_for_backward(x)
        ctx.count = x.numel() // max(mean.numel(), 1)
        return mean.flatten(), var.flatten()

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        (x,) = ctx.saved_tensors
        # recomputed rather than saved, so that this backward is differentiable w.r.t. x through it too
        mean = x.to(grad_var.dtype if grad_var is not None else grad_mean.dtype).mean(
            [0] + list(range(2, x.dim())), keepdim=True)
        shape = mean.shape
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.view(shape)
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.view(shape)
        # d mean / dx = 1/M; d var / dx = 2 (x - mean) / M (the term through mean sums to zero)
        a = 2 * grad_var / ctx.count
        b = grad_mean / ctx.count - a * mean
        return (x * a + b).to(x.dtype)


@contextlib.contextmanager
def _forwards(replacements):
    """Replaces each module's forward for the duration (an instance attribute shadows the class's)."""
    saved = {m: m.__dict__.get("forward") for m in replacements}
    for m, forward in replacements.items():
        m.forward = forward
    try:
        yield
    finally:
        for m, forward in saved.items():
            if forward is None:
                del m.forward
            else:
                m.forward = forward


class CleanPassState:
    """Records, in one forward (``record``), the batch statistics of each batch-statistics BatchNorm and the mask
    of each dropout module of a model; a later forward under ``replay(rows)`` normalises with those statistics
    (updating no running statistics) and multiplies by rows `rows` of those masks (None: all, in order). The
    recorded statistics keep their graph: gradients reach the parameters through them in the replayed pass as
    they do in the recorded one."""

    def __init__(self, model):
        modules = list(model.modules()) if isinstance(model, nn.Module) else []
        self.norms = [m for m in modules if uses_batch_stats(m)]
        self.dropouts = [m for m in modules if draws_mask(m)]
        for m in self.norms:
            if isinstance(m, nn.SyncBatchNorm) and torch.distributed.is_available() \
                    and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                raise NotImplementedError("jacobian_penalty: SyncBatchNorm in train mode across processes is not "
                                          "supported (the perturbed pass needs the clean pass's statistics)")
        # torch.compile(model) wraps it (with _orig_mod); model.compile() sets _compiled_call_impl in place.
        compiled = getattr(model, "_orig_mod", None) is not None or \
            getattr(model, "_compiled_call_impl", None) is not None
        if self.modules and compiled:
            # Dynamo does not guard on forward hooks by default (skip_nnmodule_hook_guards): a graph compiled
            # without the recording hooks would silently skip them, so the replay would normalise wrongly.
            raise NotImplementedError("jacobian_penalty: a torch.compile'd model with BatchNorm in train mode (or "
                                      "dropout) needs rkd_fast.clean_pass.share_clean_statistics(model) before "
                                      "compiling (the clean and perturbed passes then share statistics and masks in "
                                      "one call)")
        self.stats = {m: [] for m in self.norms}
        self.masks = {m: [] for m in self.dropouts}

    @property
    def modules(self):
        return self.norms + self.dropouts

    def _record_stats(self, module, args):
        self.stats[module].append(_ChannelMoments.apply(args[0]))

    def _record_mask(self, module, x):
        mask = _draw_mask(module, x)
        self.masks[module].append(mask)
        return _apply_mask(module, mask, x)

    @contextlib.contextmanager
    def record(self):
        handles = [m.register_forward_pre_hook(self._record_stats) for m in self.norms]
        try:
            with _forwards({m: functools.partial(self._record_mask, m) for m in self.dropouts}):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def replay(self, rows=None, fused=True):
        # a module called twice replays in order
        stats = {m: list(self.stats[m]) for m in self.norms}
        masks = {m: [mask if rows is None else mask[rows] for mask in self.masks[m]] for m in self.dropouts}

        def masked(module, x):
            if not masks[module]:
                raise RuntimeError("jacobian_penalty: the perturbed pass called a dropout module more times than "
                                   "the clean pass; the model's control flow must not depend on its input")
            return _apply_mask(module, masks[module].pop(0), x)

        replacements = {m: functools.partial(_normalize_with, m, stats[m], fused) for m in self.norms}
        replacements.update({m: functools.partial(masked, m) for m in self.dropouts})
        with _forwards(replacements):
            yield
        if any(stats.values()) or any(masks.values()):
            raise RuntimeError("jacobian_penalty: the perturbed pass called a BatchNorm or dropout module fewer "
                               "times than the clean pass; the model's control flow must not depend on its input")


class _SharedCleanPass:
    """Behaviour mixed into BatchNorm and dropout modules by `share_clean_statistics`: with ``clean_rows = n > 0``
    (set by `clean_rows` around one call) rows ``[0, n)`` are the clean pass, the others the perturbed rows
    ``perturbed_rows`` of it (None: all n, in order). ``clean_rows = 0`` is the ordinary module."""

    clean_rows = 0
    perturbed_rows = None


class _SharedStatistics(_SharedCleanPass):
    """BatchNorm: rows ``[0, n)`` are normalised by the ordinary forward (which updates the running statistics),
    the others with the batch statistics of rows ``[0, n)`` (`_normalize_with`, in the graph)."""

    def forward(self, x):
        n = self.clean_rows
        if n == 0 or not uses_batch_stats(self):
            return super().forward(x)
        clean = x[:n]
        stats = [_ChannelMoments.apply(clean)]
        return torch.cat([super().forward(clean), _normalize_with(self, stats, True, x[n:])])


class _SharedMask(_SharedCleanPass):
    """Dropout: one mask is drawn for rows ``[0, n)`` and the perturbed rows are multiplied by its rows."""

    def forward(self, x):
        n = self.clean_rows
        if n == 0 or not draws_mask(self):
            return super().forward(x)
        mask = _draw_mask(self, x[:n])
        rows = self.perturbed_rows
        return x * torch.cat([mask, mask if rows is None else mask[rows]])


@functools.cache
def _shared_class(cls):
    mixin = _SharedMask if issubclass(cls, _DropoutNd) else _SharedStatistics
    return type(f"{mixin.__name__.lstrip('_')}{cls.__name__}", (mixin, cls), {"__module__": __name__})


def share_clean_statistics(model):
    """Converts, in place, every BatchNorm (except SyncBatchNorm) and dropout module of `model` so that
    `jacobian_penalty` can run its clean and perturbed student passes as one batched call, which also works when
    the model is ``torch.compile``'d (module docstring). Parameters, buffers and state_dict keys are unchanged, and
    outside `jacobian_penalty` the modules behave as before. Convert before compiling. Returns `model`."""
    for module in model.modules():
        if isinstance(module, _SharedCleanPass):
            continue
        if (isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm)) or \
                (isinstance(module, _DropoutNd) and not isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout))):
            module.__class__ = _shared_class(type(module))
    return model


def shares_clean_statistics(model):
    """True when every batch-statistics BatchNorm and mask-drawing dropout module of the model has been converted
    (and there is at least one)."""
    modules = [m for m in model.modules() if uses_batch_stats(m) or draws_mask(m)] \
        if isinstance(model, nn.Module) else []
    return bool(modules) and all(isinstance(m, _SharedCleanPass) for m in modules)


@contextlib.contextmanager
def clean_rows(model, n, rows=None):
    """Inside: the converted modules of `model` take rows ``[0, n)`` of their input as the clean pass and the rest
    as its perturbed rows `rows` (None: all n, in order)."""
    modules = [m for m in model.modules() if isinstance(m, _SharedCleanPass)]
    for m in modules:
        m.clean_rows, m.perturbed_rows = n, rows
    try:
        yield
    finally:
        for m in modules:
            del m.clean_rows, m.perturbed_rows  # back to the class defaults
