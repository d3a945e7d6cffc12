"""The teacher's soft labels computed once before training (`--teacher-cache`): RobustKDLoss given the teacher's
logits, the training split served in order and with its indices, and runs that train the same student with and
without the cache, in one process, resumed, and in two (torchrun)."""

import contextlib
import copy
import math
import shutil

import pytest
import torch

from _digits_model import FAST_FLAGS, FAST_TRAINING, digits_batch, tiny_cnn
from rkd_fast import RobustKDLoss
from rkd_fast.cli import main
from rkd_fast.datasets import GPULoader
from rkd_fast.train import checkpoints, train_model
from rkd_fast.train.methods import RunSettings, create

FAST = {**FAST_TRAINING, "epochs": 2, "deterministic": True}
# robust-kd with Fashion-MNIST's defaults (the teacher's clean soft labels alone at the N-FGSM point), on digits
CLEAN_SOFT_LABELS = {"teacher_at": "clean", "ce_weight": 0.0, "feat_weight": 0.0}


def _counting_teacher_calls(monkeypatch):
    """The number of the loss's teacher forwards so far, as a one-element list updated in place."""
    calls = [0]
    teach = RobustKDLoss._teach

    def counted(self, x):
        calls[0] += 1
        return teach(self, x)

    monkeypatch.setattr(RobustKDLoss, "_teach", counted)
    return calls


@pytest.mark.parametrize("eps, ce_weight", [(None, 1.0), (0.1, 0.0), (0.1, 0.7)])
def test_given_teacher_logits_replace_the_teachers_forward(eps, ce_weight, monkeypatch):
    student, teacher = tiny_cnn(0), tiny_cnn(1, width=8)
    x, y = digits_batch(12)
    options = dict(eps=eps, ce_weight=ce_weight, kd_weight=1.3, kd_temperature=2.0, feat_weight=0.0, jac_weight=0.0)
    if eps is not None:
        options["teacher_at"] = "clean"
    loss_fn = RobustKDLoss(student, teacher, **options)
    assert loss_fn.takes_teacher_logits
    state = copy.deepcopy(student.state_dict())
    total, terms = loss_fn(x, y, seed=3)
    student.load_state_dict(state)  # undo the running-statistics update
    logits = loss_fn.teacher_logits(x)
    calls = _counting_teacher_calls(monkeypatch)
    given_total, given_terms = loss_fn(x, y, seed=3, teacher_logits=logits)
    assert calls[0] == 0
    assert torch.equal(given_total, total) and given_terms.keys() == terms.keys()
    assert all(torch.equal(given_terms[k], terms[k]) for k in terms)


@pytest.mark.parametrize("options, message", [
    ({"feat_weight": 1.0, "feature_pairs": [("block3", "block3")]}, "only where"),
    ({"jac_weight": 1.0}, "only where"),
    ({"kd_weight": 0.0}, "only where"),
    ({"eps": 0.1, "teacher_at": "student"}, "only where"),
    ({"rows": 5}, "5 rows for a batch of 12"),
])
def test_teacher_logits_are_refused_where_the_loss_needs_more(options, message):
    student, teacher = tiny_cnn(0), tiny_cnn(1)
    x, y = digits_batch(12)
    rows = options.pop("rows", 12)
    loss_fn = RobustKDLoss(student, teacher, example_input=x, **{"feat_weight": 0.0, "jac_weight": 0.0, **options})
    with pytest.raises(ValueError, match=message):
        loss_fn(x, y, teacher_logits=torch.zeros(rows, 10))


def test_the_split_in_order_and_the_batches_indices():
    x = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8)
    y = torch.arange(10)
    loader = GPULoader(x, y, 4, augment=False, shuffle=True, seed=2)
    ordered = list(loader.in_order(3))
    assert [len(b[1]) for b in ordered] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[0] for b in ordered]), x.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in ordered]), y)
    plain = list(loader)
    loader.yield_indices = True
    indexed = list(loader)
    for (xb, yb), (xi, yi, index) in zip(plain, indexed):
        assert torch.equal(xb, xi) and torch.equal(yb, yi) and torch.equal(y[index], yb)
    assert sorted(torch.cat([b[2] for b in indexed]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="cropped and flipped"):
        next(GPULoader(x, y, 4, augment=True, pad=1).in_order(3))


@pytest.mark.parametrize("method, options", [("kd", {}), ("robust-kd", CLEAN_SOFT_LABELS)])
def test_the_cache_trains_the_same_student_without_the_teachers_forward_per_step(method, options, teacher_file,
                                                                                 monkeypatch):
    calls = _counting_teacher_calls(monkeypatch)
    plain = train_model(method=method, teacher=str(teacher_file), teacher_cache="off", **options, **FAST)
    steps = calls[0] - 1  # one forward reads the shapes when the loss is built
    calls[0] = 0
    cached = train_model(method=method, teacher=str(teacher_file), **options, **FAST)  # "auto": digits qualifies
    # the split once (1,257 images in batches of 256), not once per step (2 epochs of 5 steps)
    assert steps == 10 and calls[0] == 1 + math.ceil(1257 / 256)
    # The teacher's logits of a sample come from another batch: equal up to rounding (equal bit for bit where
    # the convolutions round a sample alike in any batch, as on the CPUs measured).
    for a, b in zip(plain.model.state_dict().values(), cached.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for row_a, row_b in zip(plain.metrics, cached.metrics):
        for key in row_a:
            if key.startswith("train_") and key != "train_seconds":
                assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-6), key


def test_teacher_cache_on_is_refused_where_it_cannot_be_used(tmp_path, teacher_file):
    # a loss that asks more of the teacher than its clean soft labels: refused before any file is written
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--teacher-cache on: the teacher's soft labels"):
        train_model(method="robust-kd", teacher=str(teacher_file), teacher_cache="on", out=str(out), **FAST)
    assert not out.exists()
    # augmented training images: the method says so when the trainer asks
    student, teacher = tiny_cnn(0), tiny_cnn(1)
    run = RunSettings(eps=0.1, alpha=None, attack_steps=1, precision="fp32", label_smoothing=0.0, batch_size=8,
                      arch="small_cnn", teacher_arch="small_cnn")
    example = digits_batch(2)[0]
    method = create("kd", student, teacher, run, example, contextlib.nullcontext, teacher_cache="on")
    with pytest.raises(ValueError, match="cropped and flipped anew"):
        method.plan_precompute(fixed_inputs=False)
    assert method.plan_precompute(fixed_inputs=True)
    off = create("kd", student, teacher, run, example, contextlib.nullcontext, teacher_cache="off")
    assert not off.plan_precompute(fixed_inputs=True)
    with pytest.raises(SystemExit):
        main(["train", "--method", "kd", "--teacher", str(teacher_file), "--teacher-cache", "sometimes",
              "--out", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_a_resumed_run_computes_the_cache_again(tmp_path, teacher_file):
    args = ["train", "--method", "kd", "--teacher", str(teacher_file), "--epochs", "2", *FAST_FLAGS,
            "--ckpt-every", "2", "--keep", "10", "--deterministic", "--seed", "4"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*args, "--out", str(whole)]) == 0
    shutil.copytree(whole, resumed)
    for step, path in checkpoints.list_checkpoints(resumed):
        if step > 6:  # back to global step 6: inside the second epoch
            path.unlink()
    (resumed / "best.pt").unlink()
    assert main([*args, "--out", str(resumed), "--resume"]) == 0
    final = [checkpoints.read_checkpoint(checkpoints.checkpoint_path(d, 10))["student"] for d in (whole, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
