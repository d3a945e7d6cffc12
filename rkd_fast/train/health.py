"""Non-finite losses and weights: a diverged run stops, and nothing non-finite is ever written."""

import torch

from ..model_file import describe_names, nonfinite_tensors


class NonFiniteError(RuntimeError):
    """A training step's loss was NaN or infinite (more often than --max-bad-steps allows), or the weights about
    to be written are: the run stops without writing them."""


class LossHealth:
    """Watches each step's loss for NaN and Inf without a host synchronisation per step: the first bad step and
    which terms were bad are recorded on the device, and `check()` (called every few steps, before every
    checkpoint and at each epoch end, on every rank at once) raises NonFiniteError naming them. With
    ``max_bad_steps`` K > 0 each step is looked at on the host (one sync per step) so that a bad step's update
    can be skipped; the run stops at the (K+1)-th bad step. Under fp16 the loss scaler skips a step whose
    gradients overflowed on its own; that is not a bad step (the loss itself was finite)."""

    def __init__(self, max_bad_steps, device, dist):
        self.max_bad_steps, self.dist = max_bad_steps, dist
        self.bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_terms = None  # the terms' values at the first bad step, in the order of `names`
        self.names = ()
        self.skipped_last = False

    def record(self, global_step, total, terms):
        """Records this step's loss; True when its update should be applied. A handful of device ops: the
        terms (detached already) are looked at only when a check finds a bad step."""
        values = torch.stack([v.float() for v in terms.values()])
        if self.first_terms is None:
            self.names, self.first_terms = tuple(terms), torch.zeros_like(values)
        bad = torch.isfinite(total.detach()).logical_not_()
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, global_step, self.first_step)
        self.first_terms = torch.where(first, values, self.first_terms)
        self.bad_steps += bad
        self.skipped_last = False
        if self.max_bad_steps > 0 and bool(bad):  # the opted-in per-step sync
            self.skipped_last = True
            self.check()
        return not self.skipped_last

    def check(self):
        counts = self.dist.all_reduce_sum(self.bad_steps.clone().view(1))
        total_bad = int(counts.item())
        if total_bad <= self.max_bad_steps:
            return
        step = int(self.first_step)
        if step < 0:
            where = "on another process"
        else:
            flags = torch.isfinite(self.first_terms).logical_not_().tolist()
            names = [n for n, f in zip(self.names, flags) if f] or ["total"]
            where = f"first at global step {step + 1} (term{'s' if len(names) > 1 else ''} {', '.join(names)})"
        allowed = f" (--max-bad-steps {self.max_bad_steps})" if self.max_bad_steps else ""
        raise NonFiniteError(
            f"the training loss was NaN or infinite in {total_bad} step(s){allowed}, {where}; the run stops and "
            f"no checkpoint is written after it (try a lower --lr, or --max-bad-steps K for fp16 overflows)")


def finite_or_raise(state_dict, what, action):
    """NonFiniteError naming the tensors of `state_dict` that hold NaN or Inf."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise NonFiniteError(f"{what} has non-finite values in {describe_names(bad)}: {action}")
