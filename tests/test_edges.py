"""Inputs at the edges: one line naming the problem (exit 2 before anything is written, or exit 1 for a write that
fails), never a traceback: numbers past float32's range, seeds past 2**64, NaN timings, run.json files that are not
a run's record, image sizes an architecture cannot take, read-only output folders."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from rkd_fast.cli import main
from rkd_fast.train import checkpoints
from _digits_model import FAST_FLAGS

TRAIN = ["train", "--method", "natural", "--epochs", "1", *FAST_FLAGS]


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["--eps", "1e39"], "--eps 1e+39 is beyond float32's range"),
    (["--alpha", "1e39", "--eps", "0.1"], "--alpha 1e+39 is beyond float32's range"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2**64)"),
])
def test_train_numbers_past_their_range(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), *args]) == 2
    _one_line(capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--eps", "1e39"], "--eps 1e+39 is beyond float32's range"),
    (["--norm", "l2", "--eps", "1e308"], "--eps 1e+308 is beyond float32's range"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2**64)"),
])
def test_eval_numbers_past_their_range(tmp_path, capsys, teacher_file, args, message):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(teacher_file), "--dataset", "digits", "--attacks", "clean",
                 "--out", str(out), *args]) == 2
    _one_line(capsys, message)
    assert not out.exists()


def test_bench_refuses_a_nan_min_time(tmp_path, capsys):
    for option in ("--min-time", "--kernel-min-time"):
        assert main(["bench", "--quick", "--out", str(tmp_path / "bench"), option, "nan"]) == 2
        _one_line(capsys, f"{option} must be a finite number of seconds >= 0, got nan")
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("content, message", [("[1, 2]", "holds a JSON list, not a run's record"),
                                              ('{"config": ', "is not valid JSON")])
def test_a_resume_with_a_damaged_run_json_names_it(finished_run, tmp_path, capsys, content, message):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "run.json").write_text(content)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 2
    _one_line(capsys, f"{out / 'run.json'} {message}")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_an_image_size_the_architecture_cannot_take_is_refused_before_run_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", "--dataset", "synthetic-imagenet", "--arch", "small_cnn",
                 "--image-size", "1", "--synthetic-batches", "1", "--batch-size", "2", "--val-size", "2",
                 "--no-progress", "--out", str(out)]) == 2
    _one_line(capsys, "small_cnn needs inputs of at least 4×4 pixels, got (1, 1)")
    assert not out.exists()


def test_a_val_size_beyond_the_split_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", "--dataset", "synthetic-imagenet", "--image-size", "8",
                 "--val-size", str(10 ** 9), "--no-progress", "--out", str(out)]) == 2
    _one_line(capsys, "--val-size 1000000000: synthetic-imagenet's val split has at most 50000 images")
    assert not out.exists()


# --- read-only outputs -------------------------------------------------------------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Makes folders read-only as a read-only file system does, also for root (whom permissions do not stop):
    creating a file or a folder under one fails with EROFS."""
    folders = []
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path):
        full = Path(os.fspath(path)).absolute()
        return any(full.is_relative_to(folder) for folder in folders)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return lambda folder: folders.append(Path(folder).absolute())


def test_read_only_outputs_are_one_line(finished_run, tmp_path, capsys, read_only):
    ro = tmp_path / "ro"
    (ro / "existing").mkdir(parents=True)
    read_only(ro)
    assert main(["plot", str(finished_run), "--out", str(ro / "curves.png")]) == 1
    _one_line(capsys, f"rkd-fast plot: error: {ro / 'curves.png'}: Read-only file system (EROFS)")
    assert main(["export", str(finished_run), str(ro / "model.pt")]) == 1
    _one_line(capsys, f"rkd-fast export: error: {ro / 'model.pt'}: Read-only file system (EROFS)")
    for command in ("demo", "frontier"):  # refused at the lock, before any training
        assert main([command, "--quick", "--no-progress", "--out", str(ro / command)]) == 2
        _one_line(capsys, f"rkd-fast {command}", f"cannot create {ro / command}: Read-only file system (EROFS)")
        assert main([command, "--quick", "--no-progress", "--out", str(ro / "existing")]) == 2
        _one_line(capsys, f"rkd-fast {command}", f"cannot write {ro / 'existing' / '.rkd_fast.lock'}: Read-only")
    assert [p.name for p in ro.rglob("*")] == ["existing"] and not list((ro / "existing").iterdir())
    assert checkpoints.list_checkpoints(finished_run)  # the run read is untouched
    json.loads((finished_run / "run.json").read_text())
