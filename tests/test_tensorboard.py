"""`rkd-fast train --tensorboard`: the event file holds every column of metrics.csv for every epoch; without the
tensorboard package the option is refused before anything is written."""

import csv
import sys

import pytest

from rkd_fast.cli import main
from rkd_fast.train import train_model
from rkd_fast.train.tensorboard import tag
from _digits_model import FAST_FLAGS

FAST_ARGS = ["--epochs", "2", *FAST_FLAGS, "--deterministic"]


def _scalars(log_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {name: [(e.step, e.value) for e in accumulator.Scalars(name)] for name in accumulator.Tags()["scalars"]}


def test_tensorboard_holds_every_metric_of_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", *FAST_ARGS, "--tensorboard", "--out", str(out)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scalars = _scalars(out / "tensorboard")
    expected_tags = {"loss/ce", "loss/total", "lr", "throughput/images_per_s", "val/clean_acc", "val/robust_acc",
                     "time/train_seconds", "time/eval_seconds"}
    assert set(scalars) == expected_tags == {tag(column) for column in rows[0] if column != "epoch"}
    for column in rows[0]:
        if column != "epoch":
            # float32 in the event file
            assert scalars[tag(column)] == [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6)) for r in rows]


def test_tensorboard_python_api_needs_an_output_directory():
    with pytest.raises(ValueError, match="--tensorboard needs --out DIR"):
        train_model(epochs=1, width=4, method="natural", progress=False, tensorboard=True)


def test_missing_tensorboard_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", *FAST_ARGS, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs the tensorboard package" in err and "pip install tensorboard" in err
    assert not out.exists()
