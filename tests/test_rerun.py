"""`rkd-fast train --config RUN_DIR/run.json --out NEW`: a recorded run reruns bit-identically, flags given on the
command line override the record (also when they name a default value), and a record this rkd_fast cannot read
faithfully is refused, by name, before anything is written."""

import csv
import json

import pytest
import torch

import rkd_fast
from rkd_fast.cli import build_parser, main
from rkd_fast.train import checkpoints
from rkd_fast.train.cli import config_from_args
from rkd_fast.train.rerun import RUN_FORMAT, RUN_VERSION

RUN_ARGS = ["--method", "natural", "--epochs", "2", "--width", "4", "--batch-size", "128", "--attack-steps", "1",
            "--lr", "0.02", "--seed", "3", "--no-progress", "--deterministic"]
TIMES = ("train_seconds", "images_per_s", "eval_seconds")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "first"
    assert main(["train", *RUN_ARGS, "--out", str(out)]) == 0
    return out


def _metrics(out):
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(f)]


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_run_json_carries_its_format(recorded):
    record = json.loads((recorded / "run.json").read_text())
    assert record["format"] == RUN_FORMAT and record["version"] == RUN_VERSION


def test_rerun_is_bit_identical(recorded, tmp_path):
    out = tmp_path / "again"
    assert main(["train", "--config", str(recorded / "run.json"), "--out", str(out)]) == 0
    assert _metrics(out) == _metrics(recorded)
    first, again = (checkpoints.read_checkpoint(d / "best.pt")["student"] for d in (recorded, out))
    assert all(torch.equal(first[k], again[k]) for k in first)
    command = json.loads((out / "run.json").read_text())["command"]
    # The new run records a command that reproduces it without --config
    assert "--config" not in command and command[command.index("--seed") + 1] == "3"
    assert command[command.index("--out") + 1] == str(out)


def test_flags_given_override_the_record(recorded):
    base = _config(["--config", str(recorded), "--out", "new"])  # a run directory works as well as its run.json
    assert (base.seed, base.epochs, base.lr, base.width, base.out, base.overwrite) == (3, 2, 0.02, 4, "new", False)
    changed = _config(["--config", str(recorded), "--out", "new", "--seed", "5", "--epochs", "10"])
    assert (changed.seed, changed.epochs, changed.lr) == (5, 10, 0.02)  # --epochs 10 is the default: still given
    assert rkd_fast.train.TrainConfig().epochs == 10
    # without --config the defaults are what they always were
    plain = _config(["--method", "natural", "--out", "x"])
    assert plain == rkd_fast.train.make_config(method="natural", out="x")


def _record(tmp_path, recorded, change):
    record = json.loads((recorded / "run.json").read_text())
    change(record)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format="rkd_fast.eval"), "has format 'rkd_fast.eval', not 'rkd_fast.run'"),
    (lambda r: r.update(version=RUN_VERSION + 1), f"has run.json version {RUN_VERSION + 1}; this rkd_fast"),
    (lambda r: r["config"].update(temperature_schedule="cosine"), "records option(s) this rkd_fast does not have: "
                                                                  "temperature_schedule"),
    (lambda r: (r.pop("format"), r.pop("version")), "has no format and version"),
    (lambda r: r.update(version=0), "has run.json version 0; this rkd_fast"),
    (lambda r: r.pop("config"), "is not a run.json of `rkd-fast train`"),
])
def test_records_that_cannot_be_read_faithfully_are_refused(recorded, tmp_path, capsys, change, message):
    path = _record(tmp_path, recorded, change)
    out = tmp_path / "new"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rkd-fast train: error: --config {path}") and message in err
    assert not out.exists()


def test_missing_and_unreadable_records(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{not json")
    for path, message in ((tmp_path / "none.json", "no such file"), (tmp_path / "run.json", "is not a JSON file")):
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "new")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_option_added_since_the_record_takes_its_default_with_a_warning(recorded, tmp_path):
    path = _record(tmp_path, recorded, lambda r: r["config"].pop("label_smoothing"))
    with pytest.warns(UserWarning, match="does not record label_smoothing"):
        cfg = _config(["--config", str(path), "--out", "new"])
    assert cfg.label_smoothing == 0.0
