"""Faults a run survives: two processes on one --out (an OS lock, gone with its holder), a full disk at any write
(resumable, or startable again, without --overwrite), Ctrl-C, and inputs that changed between a kill and --resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from rkd_fast import dirlock
from rkd_fast.cli import main
from rkd_fast.train import checkpoints

from _digits_model import FAST_FLAGS

# A process that takes --out's lock as every command does, says so, and holds it until killed.
HOLDER = """
import sys
from rkd_fast.dirlock import lock_directory
lock = lock_directory(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout.readline().strip() == "locked"
        yield out, child
    finally:
        child.kill()
        child.wait()


def _commands(out, teacher):
    return {
        "train": ["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS],
        "train --resume": ["train", "--method", "natural", "--epochs", "1", "--out", str(out), "--resume", *FAST_FLAGS],
        "demo": ["demo", "--quick", "--out", str(out), "--no-progress"],
        "frontier": ["frontier", "--quick", "--out", str(out), "--no-progress"],
        "eval": ["eval", "--checkpoint", str(teacher), "--dataset", "digits", "--attacks", "clean", "--n-examples",
                 "20", "--out", str(out), "--no-progress"],
    }


def test_a_second_process_on_the_same_out_is_refused_naming_the_holder(holder, teacher_file, capsys):
    out, child = holder
    for name, args in _commands(out, teacher_file).items():
        assert main(args) == 2, name
        err = capsys.readouterr().err.strip()
        assert f"in use by another rkd-fast process (pid {child.pid})" in err and "\n" not in err, (name, err)
        assert [p.name for p in out.iterdir()] == [dirlock.LOCK_FILE], name  # nothing written


def test_a_killed_holder_leaves_no_lock(holder, capsys):
    out, child = holder
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (out / dirlock.LOCK_FILE).is_file()  # the file stays, the kernel's lock went with the process
    assert main(["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS]) == 0
    assert checkpoints.list_checkpoints(out) and not (out / dirlock.LOCK_FILE).exists()


def test_a_lock_taken_in_a_missing_folder_leaves_nothing_when_released(tmp_path):
    out = tmp_path / "a" / "b"
    with dirlock.lock_directory(out):
        assert (out / dirlock.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(dirlock.DirectoryInUse, match=f"pid {os.getpid()}"):
            dirlock.lock_directory(out)  # flock: a second open file description conflicts even in one process
    assert not (tmp_path / "a").exists()


# --- a full disk at every write of a run ---------------------------------------------------------------------

RUN = ["train", "--method", "natural", "--epochs", "2", "--ckpt-every", "3", "--keep", "2", "--deterministic",
       "--seed", "3", *FAST_FLAGS]


def _final(out):
    state = checkpoints.load_latest(out)[0]
    best = checkpoints.read_checkpoint(out / "best.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    untimed = [{k: v for k, v in row.items() if "seconds" not in k and k != "images_per_s"}
               for row in metrics["epochs"]]
    return state["student"], best["student"], untimed, metrics["best"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_full_disk_at_any_write_leaves_a_run_that_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    writes = []
    real_replace = os.replace

    def counting(src, dst, *args, **kwargs):
        writes.append(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", counting)
    assert main([*RUN, "--out", str(whole)]) == 0
    expected = _final(whole)
    total = len(writes)
    assert total > 10

    for k in range(1, total + 1):
        out = tmp_path / f"full{k}"
        count = [0]

        def full_at_k(src, dst, *args, **kwargs):
            count[0] += 1
            if count[0] == k:  # the disk fills during this file: atomic_write removes its temporary file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", full_at_k)
        assert main([*RUN, "--out", str(out)]) == 1, k
        err = capsys.readouterr().err.strip()
        assert err.startswith("rkd-fast train: error: ") and "No space left on device (ENOSPC)" in err, (k, err)
        assert str(out) in err and "\n" not in err and "Traceback" not in err, (k, err)

        monkeypatch.setattr(os, "replace", real_replace)
        with warnings.catch_warnings():  # a run stopped before its first checkpoint starts over, with a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            code = main([*RUN, "--out", str(out), "--resume"])
        if code == 2:  # nothing to resume: a plain start must then be accepted
            assert "no readable checkpoint" in capsys.readouterr().err, k
            code = main([*RUN, "--out", str(out)])
        assert code == 0, (k, capsys.readouterr().err)
        got = _final(out)
        assert _same(got[0], expected[0]) and _same(got[1], expected[1]), k
        assert got[2:] == expected[2:], k
        assert not list(out.rglob("*.tmp")), k


def test_os_errors_are_one_line_naming_the_path_and_errno(tmp_path, monkeypatch, capsys):
    import rkd_fast.atomic as atomic

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run" / ".tmp123"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    assert main(["train", "--method", "natural", "--epochs", "1", "--out", str(tmp_path / "run"), *FAST_FLAGS]) == 1
    err = capsys.readouterr().err.strip()  # the file the run was writing, not the temporary name
    assert err == f"rkd-fast train: error: {tmp_path / 'run' / '.rkd_fast_files'}: Permission denied (EACCES)"


def test_torch_save_failing_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import rkd_fast.atomic as atomic

    class Full:  # a file whose third write finds the disk full, as torch.save's zip writer meets it
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += 1
            if self.n > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    path = tmp_path / "model.pt"
    with pytest.raises(OSError) as info:
        atomic.atomic_write(path, lambda f: torch.save({"w": torch.zeros(1000)}, Full(f)))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_ctrl_c_is_one_line_naming_the_step(tmp_path, capsys, monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = [0]

    def interrupt(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt

    handle = register_optimizer_step_post_hook(interrupt)
    try:
        out = tmp_path / "run"
        assert main(["train", "--method", "natural", "--epochs", "2", "--ckpt-every", "2", "--out", str(out),
                     *FAST_FLAGS]) == 130
    finally:
        handle.remove()
    err = capsys.readouterr().err.strip()
    assert err == "rkd-fast train: interrupted at step 3; resume with --resume"
    assert main(["train", "--method", "natural", "--epochs", "2", "--ckpt-every", "2", "--out", str(out), "--resume",
                 *FAST_FLAGS]) == 0


# --- inputs that changed between a kill and --resume ------------------------------------------------------------

def test_a_resume_whose_teacher_file_changed_is_refused_naming_it(tmp_path, capsys):
    from _digits_model import save_model, tiny_cnn

    teacher = tmp_path / "teacher.pt"
    save_model(tiny_cnn(1), teacher)
    out = tmp_path / "run"
    args = ["train", "--method", "kd", "--teacher", str(teacher), "--epochs", "1", "--out", str(out), *FAST_FLAGS]
    assert main(args) == 0
    state = checkpoints.load_latest(out)[0]
    assert len(state["inputs"]["teacher"]) == 64
    save_model(tiny_cnn(2), teacher)  # another teacher under the same name
    assert main([*args, "--epochs", "1", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "input files changed" in err and "teacher: sha256" in err and "\n" not in err


def test_a_resume_whose_cifar_file_changed_is_refused_naming_it(tmp_path):
    from rkd_fast.datasets.cifar import CIFAR_FILES
    from rkd_fast.train import make_config
    from rkd_fast.train.run_dir import check_resume_inputs, input_hashes

    folder = tmp_path / CIFAR_FILES["cifar10"]["folder"]
    folder.mkdir()
    for name, _ in [*CIFAR_FILES["cifar10"]["train"], CIFAR_FILES["cifar10"]["meta"]]:
        (folder / name).write_bytes(name.encode())
    cfg = make_config(method="natural", dataset="cifar10", data_dir=str(tmp_path))
    saved = {"inputs": input_hashes(cfg)}
    assert "data file data_batch_3" in saved["inputs"] and "data file batches.meta" in saved["inputs"]
    check_resume_inputs(saved, input_hashes(cfg), "ckpt")
    (folder / "data_batch_3").write_bytes(b"other")
    with pytest.raises(ValueError, match="data file data_batch_3: sha256") as info:
        check_resume_inputs(saved, input_hashes(cfg), "ckpt")
    assert "data_batch_1" not in str(info.value)


# --- a hung peer under data parallelism ----------------------------------------------------------------------------

# One rank of a two-process CPU job (the environment torchrun would set); rank 1 stops itself (SIGSTOP, a hung
# peer) after its 2nd optimizer step.
RANK = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from rkd_fast.cli import main
steps = [0]
def stop(*args):
    steps[0] += 1
    if os.environ["RANK"] == "1" and steps[0] == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
register_optimizer_step_post_hook(stop)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_hung_peer_stops_the_run_naming_its_rank(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    args = ["train", "--method", "natural", "--epochs", "1", "--device", "cpu", "--dist-timeout", "4",
            "--out", str(tmp_path / "run"), *FAST_FLAGS]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        started = time.monotonic()
        out, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1, err
        assert time.monotonic() - started < 60
        lines = [line for line in err.splitlines() if line.startswith("rkd-fast train")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "rank 0: no answer within --dist-timeout 4s: rank 1 stopped answering" in lines[0]
    finally:
        for process in ranks:
            process.kill()
            process.wait()


# --- output paths and inputs refused before anything runs ----------------------------------------------------------

def test_a_dangling_symlink_out_is_refused_before_anything_runs(tmp_path, teacher_file, capsys, monkeypatch):
    import rkd_fast.attacks.cli as eval_cli

    out = tmp_path / "link"
    out.symlink_to(tmp_path / "missing")
    attacked = []
    monkeypatch.setattr(eval_cli, "run_evaluation", lambda *a, **k: attacked.append(1))
    for args in (["train", "--method", "natural", "--epochs", "1", "--out", str(out), *FAST_FLAGS],
                 ["eval", "--checkpoint", str(teacher_file), "--dataset", "digits", "--attacks", "clean",
                  "--out", str(out)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert f"{out} is a symbolic link to {tmp_path / 'missing'}, which does not exist" in err and "\n" not in err
    assert not attacked and not (tmp_path / "missing").exists()


def test_frontier_checks_its_teacher_before_writing_anything(tmp_path, capsys):
    bogus = tmp_path / "NOT_A_MODEL"
    bogus.write_text("not a model")
    out = tmp_path / "study"
    args = ["frontier", "--quick", "--out", str(out), "--teacher", str(bogus), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rkd-fast frontier: error: --teacher {bogus}") and "\n" not in err
    assert not out.exists()
