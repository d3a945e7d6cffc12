"""Fixed class-stratified subsets of a split, chosen from its labels alone (never from a run's seed), so every
run and every evaluation of a data set sees the same samples."""

import torch

from .spec import VAL_SPLIT_SEED


def stratified_split(y, val_size, seed=VAL_SPLIT_SEED):
    """(train indices, val indices) of labels `y`: `val_size` samples held out with each class in proportion
    to its count (largest remainders round the quotas to exactly `val_size`), chosen by a generator seeded
    with `seed`; both index tensors sorted. The val split of CIFAR and ImageNet runs and `rkd-fast eval
    --n-examples`."""
    n = y.shape[0]
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for a split of {n} images, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * val_size / n
    quota = exact.floor().long()
    short = val_size - int(quota.sum())
    if short:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    shuffled = y[perm]
    val = torch.cat([perm[shuffled == c][:q] for c, q in zip(classes.tolist(), quota.tolist())]).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def stratified_subset(y, n):
    """Indices of n samples of `y`, classes taken in turn (the first of each class, then the second, ...), sorted:
    a fixed subset that keeps the class balance, without a random draw. The demo's and the frontier study's test
    subsets; kept apart from `stratified_split` (proportional quotas of a shuffled order), which picks other
    samples, so that their recorded numbers stay reproducible. n <= 0 or n >= len(y): every sample."""
    if n <= 0 or n >= len(y):
        return torch.arange(len(y))
    rank = torch.empty_like(y)
    for c in y.unique():
        where = (y == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    order = sorted(range(len(y)), key=lambda i: (int(rank[i]), int(y[i])))
    return torch.tensor(sorted(order[:n]))
