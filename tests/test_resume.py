"""Checkpoints and --resume: a run SIGKILLed mid-epoch and resumed ends bit-identical to an uninterrupted one;
damaged or temporary checkpoint files are never loaded; RNG states survive weights_only loading."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rkd_fast.cli import main
from rkd_fast.train import checkpoints

# A child that trains through the CLI, each optimizer step slowed down (a public global optimizer hook, no
# test code in the library) so that the parent can kill it between two checkpoints of the first epoch.
CHILD = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
from rkd_fast.cli import main
register_optimizer_step_post_hook(lambda *args: time.sleep(float(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


def _args(out, teacher):
    # robust-kd: adapters (block2 → block3), the seeded noise of the adversarial point, and the Jacobian term.
    # 1,257 samples at batch 256: 5 steps per epoch; step checkpoints at global steps 2, 4, 7, 9.
    return ["train", "--method", "robust-kd", "--teacher", str(teacher), "--out", str(out), "--epochs", "2",
            "--width", "4", "--batch-size", "256", "--attack-steps", "1", "--feature-pair", "block2:block3",
            "--jac-weight", "1",
            "--ckpt-every", "2", "--keep", "10", "--deterministic", "--no-progress", "--seed", "5"]


def _wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the training process ended early:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, teacher_file):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert main(_args(uninterrupted, teacher_file)) == 0

    child = subprocess.Popen([sys.executable, "-c", CHILD, "0.4", *_args(interrupted, teacher_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(checkpoints.checkpoint_path(interrupted, 2), child)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    found = [step for step, _ in checkpoints.list_checkpoints(interrupted)]
    assert found and max(found) < 5, f"killed too late to test a mid-epoch resume: {found}"

    assert main(_args(interrupted, teacher_file) + ["--resume"]) == 0
    final = [checkpoints.read_checkpoint(checkpoints.checkpoint_path(d, 10)) for d in (uninterrupted, interrupted)]
    for part in ("student", "method"):
        a, b = final[0][part], final[1][part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert final[0]["optimizer"]["state"].keys() == final[1]["optimizer"]["state"].keys()
    for k, state in final[0]["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], final[1]["optimizer"]["state"][k]["momentum_buffer"])
    untimed = [[{k: v for k, v in row.items() if "seconds" not in k and k != "images_per_s"}
                for row in f["history"]] for f in final]
    assert untimed[0] == untimed[1]
    run = (interrupted / "run.json").read_text()
    assert '"resumes"' in run and "ckpt-0000000" in run


def test_free_at_resumes_inside_a_batchs_replays(tmp_path):
    """free-at replays each minibatch (3 steps here) and carries its perturbation δ from step to step: a run
    resumed from a checkpoint taken between two replays of one batch ends bit-identical."""
    args = ["train", "--method", "free-at", "--free-replays", "3", "--epochs", "2", "--width", "4", "--batch-size",
            "256", "--attack-steps", "1", "--ckpt-every", "4", "--keep", "10", "--deterministic", "--no-progress"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*args, "--out", str(whole)]) == 0
    shutil.copytree(whole, resumed)
    for step, path in checkpoints.list_checkpoints(resumed):
        if step > 4:  # back to global step 4: batch 2's second replay is next
            path.unlink()
    (resumed / "best.pt").unlink()
    assert main([*args, "--out", str(resumed), "--resume"]) == 0
    final = [checkpoints.read_checkpoint(checkpoints.checkpoint_path(d, 30)) for d in (whole, resumed)]
    for part in ("student", "method"):
        a, b = final[0][part], final[1][part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else
                                            torch.equal(a[k]["delta"], b[k]["delta"]) for k in a), part
    assert final[0]["position"]["global_step"] == 30  # 5 batches × 3 replays × 2 epochs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "natural"
    assert main(["train", "--method", "natural", "--out", str(out), "--epochs", "2", "--width", "4",
                 "--batch-size", "256", "--attack-steps", "1", "--ckpt-every", "2", "--keep", "10",
                 "--no-progress"]) == 0
    return out


def test_damaged_and_temporary_files_are_never_loaded(finished_run, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    newest_step, newest = checkpoints.list_checkpoints(out)[0]
    assert newest_step == 10
    # A truncated copy and garbage, both named like newer checkpoints, and a leftover temporary file.
    data = newest.read_bytes()
    checkpoints.checkpoint_path(out, 11).write_bytes(data[: len(data) // 2])
    checkpoints.checkpoint_path(out, 12).write_bytes(b"\x00garbage")
    temporary = out / checkpoints.CHECKPOINT_DIR / ".ckpt-abcd.tmp"
    temporary.write_bytes(data)
    assert [s for s, _ in checkpoints.list_checkpoints(out)][:3] == [12, 11, 10]  # the temporary one is not listed
    with pytest.warns(RuntimeWarning, match="skipping checkpoint") as caught:
        state, path = checkpoints.load_latest(out)
    assert len(caught) == 2 and path == newest and state["position"]["global_step"] == 10
    # A resume goes back to that checkpoint (the run is complete: nothing left to train) and clears the temp file.
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        assert main(["train", "--method", "natural", "--out", str(out), "--epochs", "2", "--width", "4",
                     "--batch-size", "256", "--attack-steps", "1", "--ckpt-every", "2", "--keep", "10",
                     "--no-progress", "--resume"]) == 0
    assert not temporary.exists()


def test_resume_with_other_options_is_refused(finished_run, tmp_path, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", "--method", "natural", "--out", str(out), "--epochs", "2", "--width", "4",
                 "--batch-size", "256", "--attack-steps", "1", "--lr", "0.2", "--no-progress", "--resume"]) == 2
    assert "lr: checkpoint 0.05, now 0.2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in python's state
    path = checkpoints.atomic_save({"rng": checkpoints.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    checkpoints.set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3))
    assert torch.equal(expected[0], got[0]) and expected[1:3] == got[1:3] and np.array_equal(expected[3], got[3])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        checkpoints.save_checkpoint(tmp_path, {"step": step}, step, keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [5, 4]
