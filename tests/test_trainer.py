"""The trainer and `rkd-fast train` / `rkd-fast export`: methods, run files, export, and refusals of bad input
(each leaving an existing run untouched). Tiny runs: digits, small_cnn of width 4, PGD-1 validation."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import rkd_fast
from _digits_model import FAST_FLAGS, FAST_TRAINING, save_teacher

from rkd_fast.cli import main
from rkd_fast.models import build_model, model_info
from rkd_fast.runfiles import RunFiles
from rkd_fast.train import TrainConfig, train_model
from rkd_fast.precision import resolve_precision
from rkd_fast.train.schedule import lr_lambda

FAST = {**FAST_TRAINING, "epochs": 1, "deterministic": True}
FAST_ARGS = ["--epochs", "1", *FAST_FLAGS, "--deterministic"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "natural"
    assert main(["train", "--method", "natural", "--out", str(out), *FAST_ARGS]) == 0
    return out


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_python_api_returns_metrics_model_and_seconds():
    result = rkd_fast.train_model(method="natural", **FAST)
    assert len(result.metrics) == 1
    row = result.metrics[0]
    assert {"epoch", "lr", "train_ce", "train_total", "images_per_s", "val_clean_acc", "val_robust_acc"} <= set(row)
    assert 0 <= row["val_robust_acc"] <= row["val_clean_acc"] <= 1
    assert result.train_seconds > 0 and result.out is None
    assert not result.model.training and result.best["epoch"] == 1
    assert _same_weights(result.model, result.best_model)
    # The same options through a TrainConfig: the same weights (the run is a function of its config).
    again = train_model(TrainConfig(method="natural", **FAST))
    assert _same_weights(result.model, again.model)


def test_pgd_at_with_zero_radius_is_natural_training():
    natural = train_model(method="natural", eps=0.0, alpha=0.01, **FAST)
    pgd_at = train_model(method="pgd-at", eps=0.0, alpha=0.01, **FAST)
    assert _same_weights(natural.model, pgd_at.model)
    assert set(pgd_at.metrics[0]) >= {"train_adv_ce"}
    robust = train_model(method="pgd-at", eps=0.1, **FAST)
    assert not _same_weights(natural.model, robust.model)


def test_kd_without_its_kd_term_is_natural_training(teacher_file):
    natural = train_model(method="natural", **FAST)
    kd = train_model(method="kd", teacher=str(teacher_file), kd_weight=0.0, **FAST)
    assert _same_weights(natural.model, kd.model)
    kd = train_model(method="kd", teacher=str(teacher_file), **FAST)
    assert {"train_ce", "train_kd"} <= set(kd.metrics[0]) and "train_feat" not in kd.metrics[0]


@pytest.mark.slow
def test_cli_robust_kd_run_files_and_export(tmp_path, teacher_file):
    out = tmp_path / "run"
    args = ["train", "--method", "robust-kd", "--teacher", str(teacher_file), "--teacher-arch", "small_cnn",
            "--jac-weight", "1",  # every term, the Jacobian's too (off by default)
            "--out", str(out), *FAST_ARGS, "--epochs", "2", "--keep", "1", "--feature-pair", "block2:block3",
            "--schedule", "multistep", "--nesterov", "--label-smoothing", "0.1", "--seed", "3"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [".rkd_fast_files", "best.pt", "checkpoints", "metrics.csv",
                                                      "metrics.json", "run.json"]
    # the record of the run's files (what --overwrite removes) names exactly the files it left
    assert sorted(RunFiles(out).names()) == [
        "best.pt", "checkpoints/ckpt-00000010.pt", "metrics.csv", "metrics.json", "run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt-00000010.pt"]  # 5 steps × 2 epochs, keep 1
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_ce", "train_kd", "train_feat", "train_jac", "train_total", "val_robust_acc"} <= set(rows[0])
    for name in ("run.json", "metrics.json"):
        record = json.loads((out / name).read_text())
        assert record["config"]["method"] == "robust-kd" and record["config"]["feature_pairs"] == [["block2", "block3"]]
        assert record["seed"] == 3 and "git_commit" in record and record["versions"]["torch"] == torch.__version__
        assert "train" in record["command"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["best"]["epoch"] in (1, 2)

    state = torch.load(out / "best.pt", weights_only=True)
    assert "loss_fn.adapters.0.proj.weight" in state["method"]  # block2 (8 ch) → block3 (16 ch)
    model_file = tmp_path / "student.pt"
    assert main(["export", str(out), str(model_file)]) == 0
    model = rkd_fast.load_model(model_file)
    assert model_info(model)["arch"] == "small_cnn" and model_info(model)["num_classes"] == 10
    assert model_info(model)["meta"]["method"] == "robust-kd"
    assert model_info(model)["meta"]["val_robust_acc"] == metrics["best"]["val_robust_acc"]
    assert all(torch.equal(v, state["student"][k]) for k, v in model.state_dict().items())
    assert main(["export", str(out), str(model_file)]) == 2  # refuses to replace OUT without --overwrite
    assert main(["export", str(out), str(model_file), "--which", "last", "--overwrite"]) == 0


def test_lr_schedules():
    cfg = TrainConfig(epochs=4, schedule="cosine")
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == 1.0 and abs(f(20) - 0.5) < 1e-12 and f(40) == 0.0
    f = lr_lambda(TrainConfig(epochs=4, schedule="multistep", gamma=0.5), steps_per_epoch=10)
    assert [f(s) for s in (0, 19, 20, 29, 30)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    f = lr_lambda(TrainConfig(epochs=4, schedule="multistep", milestones=(1,)), steps_per_epoch=10)
    assert f(9) == 1.0 and abs(f(10) - 0.1) < 1e-12


# --- bad input: a clear error, exit status 2, and the existing run untouched --------------------------------

def test_refuses_an_out_dir_holding_another_run(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    assert main(["train", "--method", "natural", "--out", str(out), *FAST_ARGS]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["train", "--method", "natural", "--out", str(out), "--overwrite", *FAST_ARGS, "--seed", "7"]) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 7


def _bad_teachers(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model file")
    return {
        "five_classes": save_teacher(tmp_path / "five.pt", num_classes=5),
        "garbage": garbage,
    }


@pytest.mark.parametrize("case,extra,message", [
    ("other_arch", ["--method", "kd", "--teacher", "{teacher}", "--teacher-arch", "resnet18"],
     "is a 'small_cnn', but 'resnet18' was asked"),
    ("class_count", ["--method", "kd", "--teacher", "{five_classes}"], "has 5 classes, but 10 were asked"),
    ("garbage_teacher", ["--method", "kd", "--teacher", "{garbage}"], "not an rkd_fast model file"),
    ("missing_teacher", ["--method", "kd", "--teacher", "{missing}"], "does not exist"),
    # a RobustBench spec: RobustBench missing here, or its checkpoint not on disk (never downloaded): one line
    ("robustbench_teacher", ["--method", "kd", "--teacher", "robustbench:cifar10/Linf/X"], "Linf/X"),
    ("no_teacher", ["--method", "robust-kd"], "needs a teacher"),
    ("layer_name", ["--method", "robust-kd", "--teacher", "{teacher}", "--feature-pair", "blok3:block3"],
     "student has no module named 'blok3'; available: "),
    ("fp16_on_cpu", ["--method", "natural", "--precision", "fp16", "--device", "cpu"], "'fp16' needs a CUDA device"),
    ("bad_option", ["--method", "natural", "--keep", "0"], "keep must be >= 1"),
])
def test_bad_input_is_refused_before_anything_is_touched(case, extra, message, finished_run, teacher_file,
                                                         tmp_path, capsys):
    # --overwrite on an existing run: the error must come before the old run is removed.
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    paths = {"teacher": teacher_file, "missing": tmp_path / "missing.pt", **_bad_teachers(tmp_path)}
    extra = [arg.format(**paths) for arg in extra]
    assert main(["train", "--out", str(out), "--overwrite", *FAST_ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert "rkd-fast train: error:" in err and message in err, err
    assert _snapshot(out) == before


def test_resume_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["train", "--method", "natural", "--out", str(out), "--resume", *FAST_ARGS]) == 2
    assert "no readable checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_precision_checks(monkeypatch):
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    # A CUDA device without native bfloat16 (pre-Ampere), simulated.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match="Tesla V100 has no native bfloat16"):
        resolve_precision("bf16", torch.device("cuda"))
    assert resolve_precision("fp16", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("arch", ["preact_resnet18", "resnet18"])
def test_cifar_stem_resnets(arch):
    from rkd_fast.models import MODELS
    from rkd_fast.models import DEFAULT_FEATURE_LAYER

    full = build_model(arch)  # CIFAR-10 defaults: 3 channels, width 64
    assert full(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # CIFAR ResNet-18: 11,173,962 parameters. PreAct-ResNet-18 (kuangliu/pytorch-cifar): 11,171,146, plus the
    # final BatchNorm(512) before the classifier that the adversarial-training versions add.
    expected = {"resnet18": 11_173_962, "preact_resnet18": 11_171_146 + 2 * 512}
    assert sum(p.numel() for p in full.parameters()) == expected[arch]
    small = build_model(arch, in_channels=1, width=4, mean=[0.3], std=[0.4])
    assert small(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    assert DEFAULT_FEATURE_LAYER[arch] in dict(small.named_modules()) and arch in MODELS
    # A small_cnn student distilled from it: block3 (16, 2, 2) → layer4 (32, 1, 1) through a conv + pooling adapter.
    loss_fn = rkd_fast.RobustKDLoss(build_model("small_cnn", width=4), small, feature_pairs=[("block3", "layer4")],
                                    example_input=torch.rand(4, 1, 8, 8), jac_weight=0)
    assert isinstance(loss_fn.adapters[0].proj, torch.nn.Conv2d) and loss_fn.adapters[0].resize
    total, _ = loss_fn(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert torch.isfinite(total)


@pytest.mark.slow
@pytest.mark.parametrize("distill_at", ["adversarial", "clean"])
def test_compiled_robust_kd_with_batchnorm_student(tmp_path, teacher_file, distill_at):
    # --compile converts the student's BatchNorms to share the clean statistics in one batched Jacobian call
    # (rkd_fast.clean_pass.share_clean_statistics): the two-call scheme's hooks would be skipped by the graph.
    out = tmp_path / "run"
    args = ["train", "--method", "robust-kd", "--teacher", str(teacher_file), "--compile", "--out", str(out),
            "--jac-weight", "1", "--distill-at", distill_at, *FAST_ARGS]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(row["train_jac"]) and row["train_jac"] > 0 for row in metrics["epochs"])
