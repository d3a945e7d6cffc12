"""Data-parallel training under torchrun (CPU, gloo): N processes of batch B/N compute what one process of batch B
does (a model without BatchNorm); a run stopped mid-epoch resumes bit-identically in the same world size and
within float tolerance in another; `python -m rkd_fast` runs under torchrun.

The runs are real torchrun launches (`--standalone`: a free port), through tests/_ddp_worker.py, which registers
a BatchNorm-free digits CNN and can end a process abruptly after K optimizer steps."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import _ddp_worker  # noqa: F401  (registers small_cnn_nobn in this process too, for make_config)
from _digits_model import save_teacher
from rkd_fast.train import checkpoints
from rkd_fast.train.config import make_config
from rkd_fast import seeding
from rkd_fast.train.run_dir import check_resume_config

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_ddp_worker.py")
GLOBAL_BATCH = 128  # digits train: 1,257 samples, 10 steps; the last batch (105) splits 53/52 over two ranks


def _launch(nproc, args, stop_after=None, module=False):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if stop_after is not None:
        env["RKD_TEST_STOP_AFTER"] = str(stop_after)
    entry = ["-m", "rkd_fast"] if module else [str(WORKER)]
    if nproc == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry,
               *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def _train(out, nproc, extra, stop_after=None, batch=None):
    batch = GLOBAL_BATCH // nproc if batch is None else batch
    args = ["train", "--out", str(out), "--arch", "small_cnn_nobn", "--width", "4", "--epochs", "1",
            "--batch-size", str(batch), "--attack-steps", "1", "--device", "cpu", "--no-progress", "--seed", "3",
            "--ckpt-every", "3", "--keep", "10", *extra]
    result = _launch(nproc, args, stop_after=stop_after)
    if stop_after is None:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _final(out):
    state, path = checkpoints.load_latest(out)
    assert state is not None, f"no checkpoint in {out}"
    return state


def _assert_same_training(a, b, atol):
    assert a["position"]["global_step"] == b["position"]["global_step"]
    for part in ("student", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=atol, rtol=0, msg=f"{part}.{key}")
    ta, tb = a["history"][-1], b["history"][-1]
    for key in ta:
        if key.startswith("train_") and key != "train_seconds":
            assert ta[key] == pytest.approx(tb[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    # conftest's teacher, wider: its block3 (32 channels at 2×2) is the target of the student's block2 adapter
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", width=8)


@pytest.fixture(scope="module")
def robust_kd(teacher_file):
    # Feature term through an adapter (block2: 8 channels at 4×4 → teacher block3: 32 at 2×2, a 1×1 conv with
    # parameters) and the Jacobian term with Gaussian directions. An explicit step h: the default h scales with
    # the RMS of the batch a process sees, which differs between a rank's share and the global batch.
    return ["--method", "robust-kd", "--teacher", str(teacher_file), "--feature-pair", "block2:block3",
            "--feat-weight", "1", "--jac-weight", "1", "--jac-h", "0.01"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, robust_kd):
    out = tmp_path_factory.mktemp("ddp") / "two"
    _train(out, 2, robust_kd)
    return out


def test_per_sample_draws_are_the_global_draw_sliced():
    # Rank r of N draws the rows r::N of what one process draws for the whole global batch.
    def draws(rows):
        with seeding.per_sample_draws(rows, 7, seed=5):
            shape = (len(rows), 2, 3)
            generator = torch.Generator().manual_seed(9)  # as pgd's seeded random start
            return [seeding.normal(shape), seeding.randint(0, 2, shape), seeding.uniform((len(rows), 4), 0, 1),
                    seeding.uniform(shape, -1, 1, generator=generator), seeding.bernoulli(shape, 0.5)]

    whole = draws(torch.arange(7))
    shares = [draws(torch.arange(r, 7, 3)) for r in range(3)]
    for i, full in enumerate(whole):
        merged = torch.empty_like(full)
        for r, share in enumerate(shares):
            merged[r::3] = share[i]
        assert torch.equal(merged, full), i
    # Draws that are not one per sample of this share are made as asked; the same step seed replays them.
    def subset(seed):
        with seeding.per_sample_draws(torch.arange(3), 6, seed=seed):
            return seeding.normal((5,))
    assert torch.equal(subset(5), subset(5)) and not torch.equal(subset(5), subset(6))
    # Outside a step: torch's global generator, as any torch draw.
    torch.manual_seed(1)
    a = seeding.normal((4,))
    torch.manual_seed(1)
    assert torch.equal(a, torch.empty(4).normal_())


def test_derived_seeds_differ_by_key_and_are_stable():
    assert seeding.derive_seed(0, "epoch", 1) != seeding.derive_seed(0, "epoch", 2) != seeding.derive_seed(1, "epoch", 1)
    assert seeding.derive_seed(0, "epoch", 1) != seeding.derive_seed(0, "step", 1)
    assert seeding.derive_seed(3, "step", 7) == seeding.derive_seed(3, "step", 7) < 2 ** 63
    with pytest.raises(TypeError):
        seeding.derive_seed(0, 1.5)


@pytest.mark.slow
@pytest.mark.cross_path
def test_two_processes_train_like_one_natural(tmp_path):
    _train(tmp_path / "one", 1, ["--method", "natural"])
    _train(tmp_path / "two", 2, ["--method", "natural"])
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert two["world_size"] == 2 and two["position"]["global_batch"] == GLOBAL_BATCH
    _assert_same_training(one, two, atol=1e-5)
    # Rank 0 alone wrote the files, one metrics row per epoch with the job's global throughput.
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 4  # steps 3, 6, 9 and the epoch end


@pytest.mark.slow
@pytest.mark.cross_path
def test_two_processes_train_like_one_robust_kd(tmp_path, two_process_run, robust_kd):
    _train(tmp_path / "one", 1, robust_kd)
    one, two = _final(tmp_path / "one"), _final(two_process_run)
    assert any(k.startswith("loss_fn.adapters") for k in two["method"])  # the adapters trained, in sync
    _assert_same_training(one, two, atol=1e-5)
    assert two["history"][-1]["val_robust_acc"] == pytest.approx(one["history"][-1]["val_robust_acc"], abs=0.01)


@pytest.mark.slow
@pytest.mark.cross_path
def test_two_processes_with_the_teacher_cache_train_like_one_without(tmp_path, teacher_file):
    # Each rank looks its share's soft labels up by the samples' indices in the split.
    kd = ["--method", "kd", "--teacher", str(teacher_file)]
    _train(tmp_path / "one", 1, [*kd, "--teacher-cache", "off"])
    _train(tmp_path / "two", 2, [*kd, "--teacher-cache", "on"])
    _assert_same_training(_final(tmp_path / "one"), _final(tmp_path / "two"), atol=1e-5)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, robust_kd):
    # Two processes ended abruptly after their 5th step: the newest checkpoint is step 3's.
    out = tmp_path_factory.mktemp("ddp") / "stopped"
    result = _train(out, 2, robust_kd, stop_after=5)
    assert result.returncode != 0
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [3]
    return out


@pytest.mark.slow
def test_stopped_two_process_run_resumes_bit_identical(tmp_path, stopped_run, two_process_run, robust_kd):
    out = tmp_path / "resumed"
    shutil.copytree(stopped_run, out)
    _train(out, 2, robust_kd + ["--resume"])
    resumed, full = _final(out), _final(two_process_run)
    for part in ("student", "method"):
        for key in full[part]:
            assert torch.equal(resumed[part][key], full[part][key]), f"{part}.{key}"
    assert resumed["history"] == [{**full["history"][0], **{k: resumed["history"][0][k] for k in
                                                             ("train_seconds", "images_per_s", "eval_seconds")}}]


@pytest.mark.slow
@pytest.mark.cross_path
def test_two_process_checkpoint_resumes_in_one_process(tmp_path, stopped_run, two_process_run, robust_kd):
    out = tmp_path / "resumed"
    shutil.copytree(stopped_run, out)
    # The same per-process batch would change the global batch: refused, naming the batch size to pass.
    state = _final(out)
    cfg = make_config(state["config"], batch_size=64, resume=True)
    with pytest.raises(ValueError, match="global batch: checkpoint 128 .* pass --batch-size 128"):
        check_resume_config(state, cfg, "ckpt", world_size=1)
    check_resume_config(state, make_config(state["config"], batch_size=128, resume=True), "ckpt", world_size=1)
    _train(out, 1, robust_kd + ["--resume"])
    resumed = _final(out)
    assert resumed["world_size"] == 1
    _assert_same_training(resumed, _final(two_process_run), atol=1e-5)


@pytest.mark.slow
def test_module_entry_point_under_torchrun_refuses_sync_bn_on_cpu(tmp_path):
    result = _launch(2, ["train", "--method", "natural", "--out", str(tmp_path / "run"), "--device", "cpu",
                         "--sync-bn", "--epochs", "1", "--no-progress"], module=True)
    assert result.returncode != 0
    assert "--sync-bn needs CUDA devices" in result.stderr
    assert not (tmp_path / "run").exists()
