"""The NVIDIA DALI loader of ImageNet (`rkd_fast.datasets.DALILoader`, `rkd-fast train --loader dali`), run with
DALI's CPU decoder: the same samples, crop boxes and flips as the PyTorch loader, mid-epoch resume, and a
training run. Skips where DALI is not installed (pip install nvidia-dali-cuda120)."""

import shutil

import numpy as np
import pytest
import torch
from test_datasets import _epoch
from test_train_imagenet import TINY, _train, _weights

from rkd_fast import datasets
from rkd_fast.train import checkpoints

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")


@pytest.fixture(scope="module")
def smooth_folder(tmp_path_factory):
    """train/ and val/ of two classes × 5 images of 90×120 pixels: smooth patterns plus a little noise, larger
    than the crops, so a wrong crop box or flip shows as a large difference while resamplers differ little."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_smooth")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(5):
                k = 5 * c + i + 1
                pattern = np.stack([(xx * 2 + yy * k) % 256, (yy * 3 + k * 20) % 256, (xx * yy // (7 + k)) % 256], -1)
                pixels = np.clip(pattern + rng.integers(0, 30, pattern.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"img{i}.JPEG", quality=95)
    return root


@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_serves_the_pytorch_loaders_samples_crops_and_flips(smooth_folder, world_size):
    for rank in range(world_size):
        options = {"seed": 3, "rank": rank, "world_size": world_size, "drop_last": False}
        dali = datasets.DALILoader(smooth_folder, "train", 3, size=48, num_workers=2, **options)
        torchvision = datasets.ImageFolderLoader(smooth_folder, "train", 3, num_workers=0,
                                                 transform=datasets.imagenet_transform("train", 48), **options)
        assert len(dali) == len(torchvision) == (4 if world_size == 1 else 2)
        for epoch in (0, 1):
            got, want = _epoch(dali, epoch), _epoch(torchvision, epoch)
            assert len(got) == len(dali)
            for (x, y), (x_ref, y_ref) in zip(got, want):
                assert x.shape == x_ref.shape and x.dtype == torch.float32 and y.dtype == torch.int64
                assert torch.equal(y, y_ref)
                # Same box and flip, another resampler (measured: mean 7e-4, max 0.04 of the [0, 1] range).
                assert (x - x_ref).abs().mean() < 5e-3 and (x - x_ref).abs().max() < 0.15
                assert (x - x_ref.flip(-1)).abs().mean() > 0.05  # the tolerance tells a flip apart
        other_epoch = _epoch(torchvision, 0)[0][0]
        assert (got[0][0] - other_epoch).abs().mean() > 0.05  # ... and another epoch's crops


def test_dali_resumes_mid_epoch_and_refuses_val(smooth_folder):
    loader = datasets.DALILoader(smooth_folder, "train", 3, size=32, num_workers=1, seed=5, drop_last=False)
    whole = _epoch(loader, 2)
    tail = _epoch(loader, 2, start_batch=2)
    assert len(whole) == 4 and len(tail) == 2
    assert all(torch.equal(a, b) for (xa, ya), (xb, yb) in zip(whole[2:], tail) for a, b in ((xa, xb), (ya, yb)))
    assert len(_epoch(loader, 2)) == 4  # the offset applied to one pass only
    with pytest.raises(ValueError, match="serves the train split"):
        datasets.DALILoader(smooth_folder, "val", 3)
    with pytest.raises(FileNotFoundError, match="ImageNet train split not found"):
        datasets.DALILoader(smooth_folder / "nowhere", "train", 3)


@pytest.mark.slow
def test_train_with_the_dali_loader_and_resume_bit_identically(smooth_folder, tmp_path):
    # 10 train images at batch 4: 3 steps per epoch, a checkpoint after each; resumed after step 4 of 6.
    args = ["--method", "natural", "--dataset", "imagenet", "--data-dir", str(smooth_folder), "--loader", "dali",
            "--epochs", "2", "--batch-size", "4", "--ckpt-every", "1", "--keep", "10", "--deterministic",
            "--num-workers", "1", *TINY]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _train([*args, "--out", str(whole)]) == 0
    assert sorted(step for step, _ in checkpoints.list_checkpoints(whole)) == [1, 2, 3, 4, 5, 6]
    shutil.copytree(whole, resumed)
    for step, path in checkpoints.list_checkpoints(resumed):
        if step > 4:
            path.unlink()
    assert _train([*args, "--out", str(resumed), "--resume"]) == 0
    a, b = _weights(whole, 6), _weights(resumed, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
