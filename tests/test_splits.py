"""rkd_fast.datasets.splits: the fixed class-stratified subsets (the val splits of CIFAR and ImageNet runs, `rkd-fast
eval --n-examples`, and the demo's test subsets)."""

import pytest
import torch

from rkd_fast.datasets import load_digits, stratified_split, stratified_subset


def test_stratified_split_is_fixed_and_proportional():
    y = torch.arange(10).repeat_interleave(torch.tensor([50, 30, 20, 100, 10, 40, 60, 70, 80, 40]))
    train, val = stratified_split(y, 100)
    assert len(val) == 100 and len(train) == len(y) - 100
    assert not set(train.tolist()) & set(val.tolist())
    counts = torch.bincount(y[val], minlength=10)
    assert torch.equal(counts, torch.tensor([10, 6, 4, 20, 2, 8, 12, 14, 16, 8]))  # 1/5 of each class
    again_train, again_val = stratified_split(y, 100)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(stratified_split(y, 100, seed=1)[1], val)
    # Quotas that do not divide evenly still add up to val_size exactly (largest remainders).
    assert len(stratified_split(y, 33)[1]) == 33
    with pytest.raises(ValueError, match="val_size must be in"):
        stratified_split(y, len(y))


def test_stratified_subset_is_balanced_and_fixed():
    _, y = load_digits("test")
    index = stratified_subset(y, 200)
    assert len(index) == 200 and len(set(index.tolist())) == 200
    assert torch.bincount(y[index], minlength=10).tolist() == [20] * 10
    assert torch.equal(index, stratified_subset(y, 200))
    assert torch.equal(stratified_subset(y, 0), torch.arange(len(y)))
