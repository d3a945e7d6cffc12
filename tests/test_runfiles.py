"""rkd_fast.runfiles: a run's record of its files is trusted only as far as it can be checked. An entry that could
reach outside the run's folder makes the whole record invalid, and an invalid record deletes nothing, for train,
demo and frontier alike; a valid entry is removed only while its content is what the run wrote."""

import json
import os

import pytest

from rkd_fast.cli import main
from rkd_fast.demo import check_out
from rkd_fast.runfiles import FORMAT, RECORD, VERSION, RunFiles, sha256
from _digits_model import FAST_FLAGS

FAST_TRAIN = ["--method", "natural", "--epochs", "1", *FAST_FLAGS]


def _write_record(out, files, folders=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps({"format": FORMAT, "version": VERSION, "files": files,
                                          "folders": folders or {}}))


@pytest.fixture
def victim(tmp_path):
    """A folder outside every run with a file in it, which no record may reach."""
    folder = tmp_path / "outside_dir"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def _hostile_entries(tmp_path, victim):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "link").symlink_to(victim)  # a folder link that leads out
    (out / "file_link").symlink_to(victim / "precious.txt")
    return {
        "parent": "../outside_dir",
        "parent file": "../outside_dir/precious.txt",
        "absolute": str(victim / "precious.txt"),
        "absolute folder": str(victim),
        "dot": ".",
        "empty": "",
        "inner parent": "sub/../../outside_dir/precious.txt",
        "dot part": "sub/./x",
        "through a link": "link/precious.txt",
        "a link": "file_link",
        "backslash": "..\\outside_dir",
    }


HOSTILE = ["parent", "parent file", "absolute", "absolute folder", "dot", "empty", "inner parent", "dot part",
           "through a link", "a link", "backslash"]


def _prepare(tmp_path, victim, case, as_folder=False):
    entry = _hostile_entries(tmp_path, victim)[case]
    out = tmp_path / "run"
    notes = out / "notes.txt"
    notes.write_text("the user's notes")
    digest = sha256(victim / "precious.txt")
    if as_folder:
        _write_record(out, {}, {entry: "events.out.tfevents.*"})
    else:
        _write_record(out, {entry: digest, "notes.txt": sha256(notes)})
    return out, entry


def _untouched(tmp_path, victim):
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "run" / "notes.txt").read_text() == "the user's notes"
    assert (tmp_path / "run" / RECORD).is_file()


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_entry_invalidates_the_record_and_removes_nothing(tmp_path, victim, case):
    out, entry = _prepare(tmp_path, victim, case)
    with pytest.raises(ValueError, match="nothing was removed") as error:
        RunFiles(out).remove_all()
    assert repr(entry) in str(error.value)
    _untouched(tmp_path, victim)


@pytest.mark.parametrize("case", ["parent", "absolute folder", "dot", "through a link"])
def test_a_hostile_folder_entry_removes_nothing(tmp_path, victim, case):
    (victim / "events.out.tfevents.1").write_text("theirs")
    out, _ = _prepare(tmp_path, victim, case, as_folder=True)
    with pytest.raises(ValueError, match="nothing was removed"):
        RunFiles(out).remove_all()
    assert (victim / "events.out.tfevents.1").read_text() == "theirs"
    _untouched(tmp_path, victim)


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_train_refuses_a_hostile_record(tmp_path, victim, case, flag, capsys):
    # --resume of a run without a checkpoint starts over and so clears the recorded files too
    out, entry = _prepare(tmp_path, victim, case)
    assert main(["train", *FAST_TRAIN, "--out", str(out), flag]) == 2
    err = capsys.readouterr().err
    assert repr(entry) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    _untouched(tmp_path, victim)
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("case", HOSTILE)
def test_demo_refuses_a_hostile_record(tmp_path, victim, case):
    out, entry = _prepare(tmp_path, victim, case)
    with pytest.raises(ValueError, match="nothing was removed"):
        check_out(out, overwrite=True)
    _untouched(tmp_path, victim)


@pytest.mark.parametrize("case", HOSTILE)
def test_frontier_refuses_a_hostile_record(tmp_path, victim, case, capsys):
    out, entry = _prepare(tmp_path, victim, case)
    assert main(["frontier", "--quick", "--methods", "natural", "--out", str(out), "--overwrite",
                 "--no-progress"]) == 2
    assert repr(entry) in capsys.readouterr().err
    _untouched(tmp_path, victim)
    assert not (out / "models").exists()


@pytest.mark.parametrize("record", [["run.json"], {"files": {"run.json": None}}, "not json", {"format": FORMAT,
                                    "version": VERSION, "files": {"run.json": "abc"}}])
def test_a_record_of_another_format_removes_nothing(tmp_path, record):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / RECORD).write_text(record if isinstance(record, str) else json.dumps(record))
    with pytest.raises(ValueError, match="nothing was removed"):
        RunFiles(out).remove_all()
    assert (out / "run.json").exists()


def test_only_content_the_run_wrote_is_removed(tmp_path):
    out = tmp_path / "run"
    files = RunFiles(out)
    ours, edited, pending = (files.add(out / name) for name in ("ours.pt", "edited.pt", "pending.pt"))
    for path in (ours, edited, pending):
        path.write_text(path.name)
    files.written(ours, edited)
    edited.write_text("edited by the user since")
    with pytest.warns(RuntimeWarning, match="edited.pt.*pending.pt"):
        assert RunFiles(out).remove_all() == [ours]
    assert not ours.exists() and edited.exists() and pending.exists() and not (out / RECORD).exists()


def test_a_record_naming_a_users_file_with_a_wrong_hash_keeps_it(tmp_path):
    out = tmp_path / "run"
    _write_record(out, {"notes.txt": "0" * 64})
    (out / "notes.txt").write_text("mine")
    with pytest.warns(RuntimeWarning, match="notes.txt"):
        RunFiles(out).remove_all()
    assert (out / "notes.txt").read_text() == "mine"


def test_rolling_checkpoints_remove_only_the_runs_own(tmp_path):
    from rkd_fast.train import checkpoints

    out = tmp_path / "run"
    files = RunFiles(out)
    first = checkpoints.save_checkpoint(out, {"step": 1}, 1, keep=1, files=files)
    planted = checkpoints.checkpoint_path(out, 2)
    planted.write_bytes(b"someone else's")
    checkpoints.save_checkpoint(out, {"step": 3}, 3, keep=1, files=files)
    assert not first.exists() and planted.read_bytes() == b"someone else's"
    assert RunFiles(out).names() == [f"{checkpoints.CHECKPOINT_DIR}/{checkpoints.checkpoint_path(out, 3).name}"]


def test_a_run_records_what_it_wrote_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(out), "--tensorboard"]) == 0
    files = RunFiles(out)
    record = json.loads((out / RECORD).read_text())
    assert record["folders"] == {"tensorboard": "events.out.tfevents.*"}
    assert all(digest == sha256(out / name) for name, digest in record["files"].items())
    (out / "tensorboard" / "mine.txt").write_text("a user's file in the run's TensorBoard folder")
    assert main(["train", *FAST_TRAIN, "--out", str(out), "--tensorboard", "--overwrite"]) == 0
    assert (out / "tensorboard" / "mine.txt").exists()
    assert sorted(files.names()) == sorted(RunFiles(out).names())


def test_a_run_json_without_a_record_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert main(["train", *FAST_TRAIN, "--out", str(out), "--overwrite"]) == 2
    assert "no record of the run's files" in capsys.readouterr().err
    assert (out / "run.json").read_text() == "{}" and sorted(os.listdir(out)) == ["run.json"]
