"""Data selection of `rkd-fast train` through rkd_fast.datasets.run_data: CIFAR's held-out val split, a 1-epoch
run on tiny generated CIFAR-10 files, the errors of a missing data directory, and the default feature layers."""

import json
import shutil
import warnings

import pytest
import torch

from rkd_fast.cli import main
from rkd_fast.datasets import GPULoader, TensorValSet, ValSet, run_data
from rkd_fast.models import build_model
from rkd_fast.train import checkpoints, distributed, make_config
from rkd_fast.models import DEFAULT_FEATURE_LAYER
from test_datasets import _make_cifar10  # the colleague's generator of torchvision-format CIFAR files


def _run_data(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated files are not the published ones (md5 warning)
        return run_data(cfg, torch.device("cpu"), distributed.Distributed())


def _served(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_load_cifar10_holds_out_val(tmp_path):
    _make_cifar10(tmp_path, per_batch=20)  # 100 train images
    cfg = make_config(method="natural", dataset="cifar10", data_dir=str(tmp_path), val_size=10, arch="resnet18")
    info, train, val = _run_data(cfg)
    x, y = _served(train, 0)
    xv, yv = val.x, val.y
    assert info.name == "cifar10" and info.num_classes == 10 and info.in_channels == 3
    assert x.shape == (90, 3, 32, 32) and xv.shape == (10, 3, 32, 32) and len(y) == 90 and len(yv) == 10
    assert train.num_samples == 90 and len(val) == 10
    assert x.dtype == xv.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and 0 <= xv.min() and xv.max() <= 1
    # Same split whatever the run's seed.
    _, _, val2 = _run_data(make_config(cfg, seed=7))
    assert torch.equal(xv, val2.x)


def test_natural_one_epoch_on_cifar10_files(tmp_path):
    _make_cifar10(tmp_path / "data", per_batch=8)
    out = tmp_path / "run"
    args = ["train", "--method", "natural", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--val-size", "8", "--arch", "resnet18", "--width", "4", "--epochs", "1", "--batch-size", "16",
            "--attack-steps", "1", "--no-progress", "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "cifar10" and metrics["config"]["val_size"] == 8
    row = metrics["epochs"][0]
    assert row["val_clean_acc"] is not None and torch.isfinite(torch.tensor(row["train_ce"]))


def test_cifar_training_batches_are_augmented_and_digits_are_not(tmp_path):
    _make_cifar10(tmp_path, per_batch=8)  # 40 random images, 8 held out as val
    cfg = make_config(method="natural", dataset="cifar10", data_dir=str(tmp_path), val_size=8, batch_size=8, seed=3)
    _, loader, _ = _run_data(cfg)
    assert isinstance(loader, GPULoader) and loader.augment and len(loader) == 4
    x = loader.x.float() / 255  # the train split as the loader holds it (uint8)
    loader.y = torch.arange(len(x))  # labels that name the images, so a served image can be traced back to its source
    # Every crop (pad 4, reflect) and flip of an image: the only images the loader may serve for it.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    crops = torch.stack([padded[:, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)], 1)
    crops = torch.cat([crops, crops.flip(-1)], 1)  # (N, 162, 3, 32, 32)
    epochs = [_served(loader, e) for e in (0, 1)]
    for xb, yb in epochs:
        assert sorted(yb.tolist()) == list(range(len(x)))  # every image once per epoch
        assert all((crops[j] == img).flatten(1).all(1).any() for img, j in zip(xb, yb.tolist()))
        assert sum(torch.equal(img, x[j]) for img, j in zip(xb, yb.tolist())) < len(x) // 2  # mostly not as stored
    by_image = [xb[yb.argsort()] for xb, yb in epochs]
    assert sum(not torch.equal(a, b) for a, b in zip(*by_image)) > len(x) // 2  # new crops in a new epoch
    # A resumed epoch serves the same batches from start_batch on.
    xb, yb = epochs[1]
    tail = _served(loader, 1, start_batch=2)
    assert torch.equal(tail[0], xb[16:]) and torch.equal(tail[1], yb[16:])

    digits = make_config(method="natural", dataset="digits", batch_size=64)
    _, plain, _ = _run_data(digits)
    assert isinstance(plain, GPULoader) and not plain.augment
    xd = plain.x
    plain.y = torch.arange(len(xd))
    xb, yb = _served(plain, 0)
    assert torch.equal(xb, xd[yb]) and sorted(yb.tolist()) == list(range(len(xd)))


@pytest.mark.slow
def test_cifar_mid_epoch_resume_is_bit_identical(tmp_path):
    _make_cifar10(tmp_path / "data", per_batch=8)
    # 32 train images at batch 8: 4 steps per epoch, a checkpoint after every step (global steps 1..8).
    args = ["train", "--method", "natural", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--val-size", "8", "--arch", "resnet18", "--width", "4", "--epochs", "2", "--batch-size", "8",
            "--attack-steps", "1", "--ckpt-every", "1", "--keep", "10", "--deterministic", "--no-progress",
            "--seed", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--out", str(whole)]) == 0
        # The second run stopped after step 2 of epoch 2: its files as they were then.
        shutil.copytree(whole, resumed)
        for step, path in checkpoints.list_checkpoints(resumed):
            if step > 6:
                path.unlink()
        assert main(args + ["--out", str(resumed), "--resume"]) == 0
    final = [checkpoints.read_checkpoint(checkpoints.checkpoint_path(d, 8))["student"] for d in (whole, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("extra,message", [
    (["--data-dir", "{tmp}/nowhere"], "cifar10 train split not found under {tmp}/nowhere"),
    ([], "cifar10 needs --data-dir DIR"),
    (["--data-dir", "{tmp}", "--val-size", "0"], "val_size must be >= 1"),
])
def test_missing_data_is_a_clear_cli_error(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    extra = [word.format(tmp=tmp_path) for word in extra]
    assert main(["train", "--method", "natural", "--dataset", "cifar10", *extra, "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rkd-fast train: error: ") and message.format(tmp=tmp_path) in err
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    (dict(dataset="digits", val_size=100), "--val-size applies to --dataset cifar10/cifar100"),
    (dict(dataset="digits", download=True), "--download fetches cifar10/cifar100"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
])
def test_data_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method="natural", **options)


def test_streaming_datasets_are_not_loaded_in_memory(tmp_path):
    # Every data set comes as (info, train loader, val split); only digits' and CIFAR's val splits are held as
    # tensors, imagenet's and synthetic-imagenet's are read or generated chunk by chunk
    # (tests/test_train_imagenet.py).
    _make_cifar10(tmp_path, per_batch=8)
    configs = {"digits": {}, "cifar10": {"data_dir": str(tmp_path), "val_size": 8},
               "synthetic-imagenet": {"synthetic_batches": 2, "val_size": 4, "image_size": 8}}
    for name, options in configs.items():
        info, train, val = _run_data(make_config(method="natural", dataset=name, batch_size=4, **options))
        assert info.name == name and len(train) * 4 >= train.num_samples > 0
        assert isinstance(val, ValSet if name == "synthetic-imagenet" else TensorValSet)
        start, x, y = next(val.chunks())
        assert start == 0 and x.shape[1:] == (info.in_channels, *info.input_size) and len(x) == len(y)


@pytest.mark.parametrize("arch", sorted(DEFAULT_FEATURE_LAYER))
def test_default_feature_layer_exists(arch):
    model = torch.device("meta")  # the module names only: no weights allocated
    with model:
        names = dict(build_model(arch).named_modules())
    assert DEFAULT_FEATURE_LAYER[arch] in names
