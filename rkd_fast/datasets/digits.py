"""The embedded data set: scikit-learn's shipped 8×8 digits (1,797 real images, no download).

A fixed stratified split (seeded, so every run and every machine sees the same samples): 1,257 train,
180 validation (held out for model selection), 360 test. Pixels are scaled from 0..16 to [0, 1], images are
float32 ``(N, 1, 8, 8)``, labels int64.
"""

import functools

import torch

from .spec import DIGITS_MEAN, DIGITS_STD, DatasetInfo, DatasetSpec, register_dataset

INFO = DatasetInfo("digits", 10, 1, (8, 8), DIGITS_MEAN, DIGITS_STD, 0.1, ("train", "val", "test"))
SPLITS = INFO.splits
# The split's own definition (scikit-learn's train_test_split), not rkd_fast.datasets.stratified_split: the
# samples of each split stay those every digits result so far was measured on.
_SPLIT_SEED = 0
_TEST_SIZE = 360
_VAL_SIZE = 180


@functools.lru_cache(maxsize=1)
def _split_indices():
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=_TEST_SIZE, stratify=labels, random_state=_SPLIT_SEED)
    train, val = train_test_split(rest, test_size=_VAL_SIZE, stratify=labels[rest], random_state=_SPLIT_SEED)
    return images, labels, {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def load_digits(split="train", *, device=None):
    """Returns ``(x, y)``: ``x`` float32 ``(N, 1, 8, 8)`` in [0, 1], ``y`` int64 ``(N,)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    images, labels, splits = _split_indices()
    index = splits[split]
    x = torch.from_numpy(images[index].copy())
    y = torch.from_numpy(labels[index].copy())
    return x.to(device), y.to(device)


def _read(split, data_dir=None, *, download=False, verify=True):
    return load_digits(split)


# Never augmented: flips and crops would change the digits. Its val split is its own.
register_dataset(DatasetSpec(INFO, read=_read))
