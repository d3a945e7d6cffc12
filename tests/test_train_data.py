"""Data selection of `rkd-fast train` through rkd_fast.datasets: CIFAR's held-out val split, a 1-epoch run on
tiny generated CIFAR-10 files, the errors of a missing data directory, and the default feature layers."""

import json
import warnings

import pytest
import torch

from rkd_fast.cli import main
from rkd_fast.models import build_model
from rkd_fast.train import make_config
from rkd_fast.train.config import DEFAULT_FEATURE_LAYER, load_data, stratified_split
from test_datasets import _make_cifar10  # the colleague's generator of torchvision-format CIFAR files


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


def test_load_cifar10_holds_out_val(tmp_path):
    _make_cifar10(tmp_path, per_batch=20)  # 100 train images
    cfg = make_config(method="natural", dataset="cifar10", data_dir=str(tmp_path), val_size=10, arch="resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated files are not the published ones (md5 warning)
        info, (x, y), (xv, yv) = load_data(cfg, torch.device("cpu"))
    assert info.name == "cifar10" and info.num_classes == 10 and info.in_channels == 3
    assert x.shape == (90, 3, 32, 32) and xv.shape == (10, 3, 32, 32) and len(y) == 90 and len(yv) == 10
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # Same split whatever the run's seed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, (xv2, _) = load_data(make_config(cfg, seed=7), torch.device("cpu"))
    assert torch.equal(xv, xv2)


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
    (dict(dataset="digits", val_size=100), "--val-size applies to cifar10/cifar100"),
    (dict(dataset="digits", download=True), "--download fetches CIFAR only"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
])
def test_data_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method="natural", **options)


def test_streaming_datasets_are_refused_clearly():
    with pytest.raises(ValueError, match="synthetic-imagenet streams from disk"):
        load_data(make_config(method="natural", dataset="synthetic-imagenet"), torch.device("cpu"))


@pytest.mark.parametrize("arch", sorted(DEFAULT_FEATURE_LAYER))
def test_default_feature_layer_exists(arch):
    model = torch.device("meta")  # the module names only: no weights allocated
    with model:
        names = dict(build_model(arch).named_modules())
    assert DEFAULT_FEATURE_LAYER[arch] in names
