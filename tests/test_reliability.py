"""What goes wrong loses nothing and says why: a run whose loss goes NaN stops and writes nothing non-finite;
diverged or damaged model files are refused by name; --overwrite removes only what a run wrote; bad output
folders and options are refused before anything is written; a model file is checked before it is built."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rkd_fast import model_file
from rkd_fast.cli import main
from rkd_fast.demo import check_out
from rkd_fast.models import build_model
from rkd_fast.runfiles import RunFiles
from rkd_fast.train import checkpoints, make_config, train_model
from rkd_fast.train.health import NonFiniteError
from rkd_fast.train.trainer import Run
from _digits_model import FAST_FLAGS



def _nan_model_file(path):
    model = build_model("small_cnn", width=4)
    with torch.no_grad():
        model.head[1].weight[0, 0] = float("nan")
    return model_file.save_model(model, path)


# --- a run that goes non-finite ------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_writes_nothing_non_finite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", "--lr", "1e6", "--epochs", "3", "--out", str(out), *FAST_FLAGS]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "global step" in err and "term" in err and "Traceback" not in err
    assert not (out / "best.pt").exists() and not checkpoints.list_checkpoints(out)  # nothing after step 1 is kept


def test_max_bad_steps_skips_that_many_then_stops(tmp_path):
    with pytest.raises(NonFiniteError, match=r"\(--max-bad-steps 2\)"):
        train_model(method="natural", lr=1e6, epochs=3, width=4, batch_size=256, progress=False, max_bad_steps=2)


def test_a_state_with_nan_weights_is_never_written(tmp_path):
    run = Run(make_config(method="natural", epochs=1, width=4, batch_size=256, progress=False, out=str(tmp_path)))
    try:
        run.prepare()
        with torch.no_grad():
            next(run.student.parameters()).fill_(float("inf"))
        with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
            run._state()
    finally:
        run.close()


def test_non_finite_model_files_are_refused_by_name(tmp_path, capsys):
    path = _nan_model_file(tmp_path / "diverged.pt")
    with pytest.raises(ValueError, match="diverged.pt: non-finite weights"):
        model_file.load_model(path)
    # as a teacher: refused before the run writes anything
    out = tmp_path / "run"
    assert main(["train", "--method", "kd", "--teacher", str(path), "--out", str(out), *FAST_FLAGS]) == 2
    assert "diverged.pt: non-finite weights" in capsys.readouterr().err and not out.exists()


def test_export_refuses_a_diverged_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS]) == 0
    ckpt = checkpoints.list_checkpoints(out)[0][1]
    state = torch.load(ckpt, weights_only=True)
    next(iter(state["student"].values())).fill_(float("nan"))
    torch.save(state, ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "model.pt")]) == 2
    assert "non-finite weights" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()


# --- damaged files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_files_are_named_everywhere(tmp_path, capsys, fraction):
    saved = model_file.save_model(build_model("small_cnn", width=4), tmp_path / "model.pt")
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="model.pt"):
        model_file.load_model(saved)
    assert main(["train", "--method", "kd", "--teacher", str(saved), "--out", str(tmp_path / "r"), *FAST_FLAGS]) == 2
    assert "model.pt" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--method", "natural", "--epochs", "1", "--out", str(run), *FAST_FLAGS]) == 0
    ckpt = checkpoints.list_checkpoints(run)[0][1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=ckpt.name):
        checkpoints.read_checkpoint(ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "m.pt")]) == 2
    assert ckpt.name in capsys.readouterr().err


# --- model files are checked before they are built ----------------------------------------------------------------

def _edit_model_file(path, **changes):
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        payload[key] = value
    torch.save(payload, path)
    return path


def test_absurd_constructor_arguments_are_refused_before_building(tmp_path):
    path = model_file.save_model(build_model("small_cnn", width=4), tmp_path / "model.pt")
    _edit_model_file(path, kwargs={"width": 10 ** 7})  # 7.2 PB of weights if it were built
    with pytest.raises(ValueError, match=r"model.pt: the weights do not fit small_cnn\(\{'width': 10000000\}\)"):
        model_file.load_model(path)
    _edit_model_file(path, kwargs={"width": 4}, num_classes=5)
    with pytest.raises(ValueError, match="records num_classes 5"):
        model_file.load_model(path)
    _edit_model_file(path, num_classes=10, normalization={"mean": [0.9], "std": [0.1]})
    with pytest.raises(ValueError, match="recorded input normalisation mean"):
        model_file.load_model(path)


def test_output_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = model_file.save_model(build_model("small_cnn", width=4), tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# --- --overwrite removes only what the run wrote ---------------------------------------------------------------

def test_overwrite_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    mine = out / "checkpoints" / "my_other_model.pt"
    mine.write_bytes(b"a user's file")
    notes = out / "notes.txt"
    notes.write_text("not a run")
    args = ["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS]
    assert main(args) == 0  # unrelated files are not "another run's results"
    recorded = RunFiles(out).names()
    assert "checkpoints/my_other_model.pt" not in recorded and "notes.txt" not in recorded
    assert main([*args, "--overwrite"]) == 0
    assert mine.read_bytes() == b"a user's file" and notes.read_text() == "not a run"
    assert sorted(RunFiles(out).names()) == sorted(recorded)  # the new run's files, the same names


def test_demo_overwrite_keeps_other_files(tmp_path):
    out = tmp_path / "demo"
    (out / "models").mkdir(parents=True)
    files = RunFiles(out)
    for name in ("results.json", "models/kd.pt"):
        files.add(out / name).write_text("{}")
        files.written(out / name)
    (out / "models" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds another demo"):
        check_out(out, overwrite=False)
    check_out(out, overwrite=True)
    assert not (out / "results.json").exists() and not (out / "models" / "kd.pt").exists()
    assert (out / "models" / "notes.txt").read_text() == "mine"


def test_run_files_take_paths_relative_to_the_current_directory(tmp_path, monkeypatch):
    # `--out runs/x` is relative: the record must name runs/x/run.json as "run.json", not "runs/x/run.json"
    # (which once made the demo save its teacher to runs/x/runs/x/models/ and then not find it).
    monkeypatch.chdir(tmp_path)
    files = RunFiles(Path("runs") / "x")
    assert files.add(Path("runs") / "x" / "models" / "a.pt") == Path("runs") / "x" / "models" / "a.pt"
    files.add(tmp_path / "runs" / "x" / "run.json")
    assert files.names() == ["models/a.pt", "run.json"]
    with pytest.raises(ValueError, match="not inside the run's folder"):
        files.add(Path("elsewhere.pt"))


def test_train_with_a_relative_out_records_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "natural", "--epochs", "1", "--no-progress", "--out", "runs/a"]) == 0
    names = RunFiles(Path("runs/a")).names()
    assert "run.json" in names and "best.pt" in names and not any(n.startswith("runs/") for n in names)
    assert all((tmp_path / "runs" / "a" / n).exists() for n in names if n != "tensorboard")
    assert not (tmp_path / "runs" / "a" / "runs").exists()


# --- bad output folders and options: refused before anything is written ---------------------------------------

def test_out_under_a_file_or_unwritable(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["train", "--method", "natural", "--out", str(blocker / "run"), *FAST_FLAGS]) == 2
    assert "is not a directory" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only file system, as root cannot be denied
    assert main(["train", "--method", "natural", "--out", str(tmp_path / "ro" / "run"), *FAST_FLAGS]) == 2
    assert "cannot write in" in capsys.readouterr().err and not (tmp_path / "ro").exists()


@pytest.mark.parametrize("option,message", [
    (["--jac-fraction", "0"], "--jac-fraction must be a number in (0, 1]"),
    (["--jac-fraction", "2"], "--jac-fraction must be a number in (0, 1]"),
    (["--jac-fraction", "nan"], "--jac-fraction must be a number in (0, 1]"),
    (["--jac-temperature", "0"], "--jac-temperature must be a finite number > 0"),
])
def test_jacobian_options_are_refused_when_read(tmp_path, capsys, option, message):
    out = tmp_path / "run"
    teacher = model_file.save_model(build_model("small_cnn", width=4), tmp_path / "t.pt")
    assert main(["train", "--method", "robust-kd", "--teacher", str(teacher), "--out", str(out), *option,
                 *FAST_FLAGS]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_robust_kd_loss_options_are_refused_at_construction():
    from rkd_fast import RobustKDLoss

    student, teacher = build_model("small_cnn", width=4), build_model("small_cnn", width=4)
    with pytest.raises(ValueError, match="h must be"):
        RobustKDLoss(student, teacher, jacobian={"h": -1}, feat_weight=0)
    with pytest.raises(ValueError, match="fraction must be"):
        RobustKDLoss(student, teacher, jacobian={"fraction": 2}, feat_weight=0)


def test_a_run_killed_before_its_first_checkpoint_can_start_over(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS]
    run = Run(make_config(method="natural", epochs=1, width=4, batch_size=256, progress=False, out=str(out)))
    run.prepare()  # run.json written, then the process "dies" before the first step
    run.close()
    assert (out / "run.json").is_file() and not checkpoints.list_checkpoints(out)
    assert main(args) == 2
    assert "stopped before its first checkpoint; pass --resume" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="starts over from scratch"):
        assert main([*args, "--resume"]) == 0
    assert checkpoints.list_checkpoints(out) and "resumes" not in json.loads((out / "run.json").read_text())
