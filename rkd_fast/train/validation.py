"""The trainer's robust validation: clean and PGD accuracy on the val split, split over the ranks under torchrun
with every rank getting the single-process result (`rkd-fast eval` runs the full evaluation, rkd_fast.attacks)."""

import torch

from ..attacks import pgd
from . import distributed


def robust_accuracy(model, val, *, eps, alpha, steps, precision, autocast, seed, device, channels_last=False,
                    ctx=None):
    """(clean accuracy, PGD accuracy) of `model` on the val split `val` (a rkd_fast.datasets.TensorValSet or
    ValSet), its chunks moved to `device` (in channels_last if asked); the model is left in eval mode. A chunk's
    PGD random start is seeded with ``seed + start``, start the position of its first sample in the split. Under
    torchrun (`ctx` a distributed.Distributed) rank r attacks chunks r, r + N, ... (each exactly as one process
    would, same samples, same seed) and the counts are summed: every rank gets the single-process result."""
    ctx = ctx or distributed.Distributed()
    layout = torch.channels_last if channels_last else torch.preserve_format
    model.eval()
    counts = torch.zeros(2, dtype=torch.long, device=device)
    clean, robust = counts[0], counts[1]
    for start, xb, yb in val.chunks(rank=ctx.rank, world_size=ctx.world_size):
        xb, yb = xb.to(device, non_blocking=True, memory_format=layout), yb.to(device, non_blocking=True)
        x_adv = pgd(model, xb, yb, eps, alpha, steps, norm="linf", random_start=True, precision=precision,
                    seed=seed + start)
        with torch.no_grad(), autocast():
            clean += (model(xb).argmax(1) == yb).sum()
            robust += (model(x_adv).argmax(1) == yb).sum()
    ctx.all_reduce_sum(counts)
    n = max(len(val), 1)
    return clean.item() / n, robust.item() / n
