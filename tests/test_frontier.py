"""`rkd-fast frontier`: the study end to end in its quick mode, its summary and criterion, and the steps the
trainer derives from the threat model."""

import csv
import json
import math
import warnings

import pytest
import torch

from rkd_fast import frontier
from rkd_fast.cli import main
from rkd_fast.models import build_model
from rkd_fast.train import make_config
from rkd_fast.train.methods import build_method

pytest.importorskip("pyautoattack", reason="the study evaluates with AutoAttack: pip install pyautoattack")


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    args = ["frontier", "--quick", "--methods", "robust-kd,fgsm-rs,pgd-at", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == 2 and results["variants"] == ["robust-kd", "fgsm-rs", "pgd-at"]
    assert results["threads"] == 1 and results["jobs"] == 2 and results["evaluation_threads"] == 1
    assert len(results["rows"]) == 6 and {r["seed"] for r in results["rows"]} == {0, 1}
    for row in results["rows"]:
        assert all(0 <= row[k] <= 1 for k in ("clean", "pgd20", "autoattack")) and row["train_seconds"] > 0
        assert (row["transfer"] is None) == (row["variant"] == "pgd-at")  # the transfer examples' source
        assert (out / row["path"]).is_file()
    s = results["summary"]["robust-kd"]
    seconds = [r["train_seconds"] for r in results["rows"] if r["variant"] == "robust-kd"]
    assert s["n"] == 2 and math.isclose(s["train_seconds_mean"], sum(seconds) / 2)
    assert math.isclose(s["train_seconds_std"], abs(seconds[0] - seconds[1]) / math.sqrt(2))
    assert results["criterion"]["evaluated"] and isinstance(results["criterion"]["met"], bool)
    # the teacher is evaluated as the students are, its training seconds recorded apart
    teacher = results["teacher"]
    assert all(0 <= teacher[k] <= 1 for k in ("clean", "pgd20", "autoattack")) and teacher["train_seconds"] > 0
    assert teacher["path"] == "models/teacher.pt" and (out / "models" / "teacher.json").is_file()
    assert results["transfer_source"] == "pgd-at"
    seeds_csv = list(csv.DictReader(open(out / "seeds.csv")))
    assert len(seeds_csv) == 6 and all(isinstance(r["warnings"], list) for r in results["rows"])
    assert [r["warnings"] for r in seeds_csv] == [" | ".join(r["warnings"]) for r in results["rows"]]
    assert [r["variant"] for r in csv.DictReader(open(out / "summary.csv"))] == ["robust-kd", "fgsm-rs", "pgd-at"]
    assert (out / "frontier.png").stat().st_size > 0
    assert main(args) == 2  # a second study into the same --out is refused
    assert main([*args, "--overwrite"]) == 0


def test_an_evaluation_keeps_the_sanity_checks_warnings_and_shows_the_others(tmp_path, teacher_file, monkeypatch,
                                                                              single_thread):
    from rkd_fast import studies
    from rkd_fast.attacks import GradientMismatchWarning

    def evaluate_model(model, test, aa, eps, seed, attacks, autoattack):
        warnings.warn("the gradient lies", GradientMismatchWarning)
        warnings.warn("something else", RuntimeWarning)
        return {"clean": 1.0, "pgd20": 0.5, "autoattack": 0.25}

    monkeypatch.setattr(studies, "evaluate_model", evaluate_model)
    torch.save((torch.rand(4, 1, 8, 8), torch.arange(4)), tmp_path / "test.pt")
    job = {"key": 3, "path": str(teacher_file), "test": str(tmp_path / "test.pt"), "aa_index": [0, 1], "eps": 0.1,
           "seed": 0, "threads": 1, "autoattack": "standard"}
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        key, scores = frontier._evaluate_job(job)
    assert key == 3 and scores == {"clean": 1.0, "pgd20": 0.5, "autoattack": 0.25,
                                   "warnings": ["GradientMismatchWarning: the gradient lies"]}
    assert [w.category for w in shown] == [RuntimeWarning]


def test_a_job_with_its_scores_only_writes_the_transfer_examples(tmp_path, teacher_file, monkeypatch,
                                                                  single_thread):
    from rkd_fast import studies

    def evaluate_model(*args, **kwargs):
        raise AssertionError("a model with its scores is not evaluated again")

    monkeypatch.setattr(studies, "evaluate_model", evaluate_model)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    torch.save((x, y), tmp_path / "test.pt")
    held = {"clean": 0.75, "pgd20": 0.5, "autoattack": 0.25, "warnings": []}
    job = {"key": 1, "path": str(teacher_file), "test": str(tmp_path / "test.pt"), "aa_index": [0, 1], "eps": 0.1,
           "seed": 0, "threads": 1, "autoattack": "standard", "scores": held,
           "write_transfer": str(tmp_path / "transfer.pt")}
    assert frontier._evaluate_job(job) == (1, held)
    x_adv = torch.load(tmp_path / "transfer.pt", weights_only=True)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6


def _rows(variant, aa, seconds):
    return [{"variant": variant, "seed": i, "clean": 1.0, "pgd20": a + 0.01, "autoattack": a, "transfer": None,
             "train_seconds": t, "masking": False} for i, (a, t) in enumerate(zip(aa, seconds))]


def _known(*variants):
    return {v: (v, {}) for v in variants}


def test_criterion_from_the_means():
    rows = _rows("robust-kd", [0.80, 0.82], [1.2, 1.4]) + _rows("fgsm-rs", [0.78, 0.76], [1.0, 1.0])
    summary = frontier.summarize(rows, ["robust-kd", "fgsm-rs"], _known("robust-kd", "fgsm-rs"))
    c = frontier.criterion(summary)
    assert math.isclose(c["time_ratio_to_fgsm_rs"], 1.3) and c["met"] and c["dominated_by"] == []
    assert c["best_single_step"] == "fgsm-rs" and math.isclose(c["margin"], 0.04)
    # the best single-step baseline sets the bar: robust-kd must beat it by a point
    close = rows + _rows("n-fgsm", [0.805, 0.805], [1.5, 1.5])
    c = frontier.criterion(frontier.summarize(close, ["robust-kd", "fgsm-rs", "n-fgsm"],
                                              _known("robust-kd", "fgsm-rs", "n-fgsm")))
    assert c["best_single_step"] == "n-fgsm" and math.isclose(c["margin"], 0.005) and not c["met"]
    assert c["dominated_by"] == []
    # a faster method with more AutoAttack accuracy dominates robust-kd
    rows += _rows("n-fgsm", [0.83, 0.83], [1.1, 1.1])
    c = frontier.criterion(frontier.summarize(rows, ["robust-kd", "fgsm-rs", "n-fgsm"],
                                              _known("robust-kd", "fgsm-rs", "n-fgsm")))
    assert c["dominated_by"] == ["n-fgsm"] and not c["met"]
    # too slow
    slow = _rows("robust-kd", [0.80, 0.82], [1.6, 1.6]) + _rows("fgsm-rs", [0.78, 0.76], [1.0, 1.0])
    assert not frontier.criterion(frontier.summarize(slow, ["robust-kd", "fgsm-rs"],
                                                     _known("robust-kd", "fgsm-rs")))["met"]


def test_variants_of_ones_own(tmp_path):
    name, (method, options) = frontier.parse_variant("rkd-no-kd=robust-kd --kd-weight 0 --feature-pair conv2:conv3")
    assert (name, method, options) == ("rkd-no-kd", "robust-kd", {"kd_weight": 0.0, "feature_pairs": ["conv2:conv3"]})
    assert frontier.parse_variant("wide=fgsm-rs --width 16")[1] == ("fgsm-rs", {"width": 16})
    for text, message in [("rkd", "expected NAME=METHOD"), ("Bad Name=robust-kd", "expected NAME=METHOD"),
                          ("x=", "expected NAME=METHOD"), ("x=nope", "unknown method 'nope'"),
                          ("x=robust-kd --kd-wieght 0", "unrecognized arguments: --kd-wieght"),
                          ("x=robust-kd --kd-weight x", "invalid float value"),
                          ("x=robust-kd --seed 3", "seed belong to the study"),
                          ("x=robust-kd --eps 0.2 --dataset cifar10", "dataset, eps belong to the study"),
                          ("x=robust-kd --method kd", "not a --method flag")]:
        with pytest.raises(ValueError, match=message):
            frontier.parse_variant(text)


@pytest.mark.slow
def test_a_variant_runs_beside_the_study(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["frontier", "--quick", "--seeds", "1", "--methods", "fgsm-rs", "--variant", "fgsm:wide=fgsm-rs --width 6",
            "--out", str(out), "--no-progress", "--jobs", "1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["variants"] == ["fgsm-rs", "fgsm:wide"] and results["options"]["fgsm:wide"] == {"width": 6}
    # without a pgd-at student, the transfer examples are the teacher's
    assert results["transfer_source"] == "teacher" and (out / "models" / "transfer-teacher.pt").is_file()
    assert all(0 <= row["transfer"] <= 1 for row in results["rows"]) and results["teacher"]["transfer"] is None
    from rkd_fast.model_file import load_model
    from rkd_fast.models import model_info
    # ':' (which Windows forbids in file names) becomes '@' in the model's file name
    assert not [p for p in out.rglob("*") if ":" in p.name]
    wide = model_info(load_model(out / "models" / "fgsm@wide-seed0.pt"))
    assert wide["meta"]["study_config"]["width"] == 6 and wide["meta"]["method"] == "fgsm-rs"
    assert results["summary"]["fgsm:wide"]["method"] == "fgsm-rs"
    # a resumed study with another definition of the same name is refused; a name the study has is refused
    assert main([*args[:6], "--variant", "fgsm:wide=fgsm-rs --width 5", "--out", str(out), "--no-progress",
                 "--resume"]) == 2
    assert "other options" in capsys.readouterr().err
    assert main(["frontier", "--variant", "pgd-2=pgd-at", "--out", str(tmp_path / "s")]) == 2
    assert "already has an entry of that name" in capsys.readouterr().err
    assert main(["frontier", "--variant", "a=kd", "--variant", "a=kd", "--out", str(tmp_path / "s")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_bad_study_options_are_refused(tmp_path, capsys):
    assert main(["frontier", "--methods", "robust-kd,nope", "--out", str(tmp_path / "s")]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["frontier", "--seeds", "0", "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def _robust_kd(shape, **options):
    torch.manual_seed(0)
    arch, dataset = ("small_cnn", "digits") if shape[1] == 1 else ("preact_resnet18", "cifar10")
    student, teacher = (build_model(arch, width=2, **({"in_channels": 1} if shape[1] == 1 else {})) for _ in "st")
    cfg = make_config(method="robust-kd", teacher="unused.pt", arch=arch, dataset=dataset, **options)
    import contextlib
    return build_method(cfg, student, teacher, torch.rand(*shape), contextlib.nullcontext)


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (4, 3, 32, 32)])  # digits (D = 64) and CIFAR (D = 3,072)
@pytest.mark.parametrize("eps", [0.1, 8 / 255])
def test_default_step_is_in_units_of_the_threat_model(shape, eps):
    d = math.prod(shape[1:])
    adversarial = _robust_kd(shape, eps=eps)
    assert adversarial.loss_fn.eps == eps and math.isclose(adversarial.loss_fn.jacobian["h"], eps)
    l2 = _robust_kd(shape, eps=eps, distill_at="clean")
    assert math.isclose(l2.loss_fn.jacobian["h"], eps * math.sqrt(d))  # a unit L2 direction: the ball's radius
    linf = _robust_kd(shape, eps=eps, distill_at="clean", jac_norm="linf", jac_step=0.5)
    assert math.isclose(linf.loss_fn.jacobian["h"], 0.5 * eps)
    assert _robust_kd(shape, eps=eps, jac_h=0.3).loss_fn.jacobian["h"] == 0.3  # an absolute step overrides


@pytest.mark.slow
def test_a_study_resumes_keeping_its_finished_models(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["frontier", "--quick", "--methods", "fgsm-rs,pgd-at", "--out", str(out), "--no-progress", "--jobs", "1"]
    assert main([*args, "--seeds", "1"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert main([*args, "--seeds", "2", "--resume"]) == 0
    second = json.loads((out / "results.json").read_text())
    # Only seed 1's students were trained; seed 0's models and scores were kept as they were.
    assert sorted(second["stages"]) == ["train fgsm-rs seed 1", "train pgd-at seed 1"]
    assert second["resumed"] and len(second["rows"]) == 4
    for row in first["rows"]:
        kept = next(r for r in second["rows"] if (r["variant"], r["seed"]) == (row["variant"], row["seed"]))
        assert {k: kept[k] for k in ("clean", "pgd20", "autoattack", "train_seconds")} == \
            {k: row[k] for k in ("clean", "pgd20", "autoattack", "train_seconds")}
    # A copy without the transfer examples gets them again from their source, whose scores are kept.
    (out / "models" / "transfer-seed0.pt").unlink()
    assert main([*args, "--seeds", "2", "--resume"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert third["stages"] == {} and (out / "models" / "transfer-seed0.pt").is_file()
    assert [{k: r[k] for k in ("clean", "pgd20", "autoattack", "transfer")} for r in third["rows"]] == \
        [{k: r[k] for k in ("clean", "pgd20", "autoattack", "transfer")} for r in second["rows"]]
    # Another commit's models are refused, and so are other settings.
    import rkd_fast.provenance

    real = rkd_fast.provenance.provenance
    monkeypatch.setattr(rkd_fast.provenance, "provenance", lambda: {**real(), "git_commit": "0" * 40})
    assert main([*args, "--seeds", "2", "--resume"]) == 2
    assert "a study runs from one commit" in capsys.readouterr().err
    monkeypatch.setattr(rkd_fast.provenance, "provenance", real)
    assert main([*args, "--seeds", "2", "--resume", "--eps", "0.2"]) == 2
    assert "other options" in capsys.readouterr().err
    assert main([*args, "--resume", "--out", str(tmp_path / "none")]) == 2  # nothing to resume


@pytest.mark.slow
def test_fashion_mnist_study_smoke_run(tmp_path):
    from rkd_fast.datasets import fashion_mnist as fm

    if not all(fm._find(fm.DEBIAN_DIR, n) for images, labels, _ in fm.FILES.values() for n in (images, labels)):
        pytest.skip(f"Fashion-MNIST's files are not in {fm.DEBIAN_DIR} (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "study"
    assert main(["frontier", "--dataset", "fashion-mnist", "--quick", "--seeds", "1", "--methods", "robust-kd,pgd-at",
                 "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "fashion-mnist" and results["eps"] == 0.1 and results["settings"]["train_size"]
    assert all(0 <= r["clean"] <= 1 for r in results["rows"]) and results["test_samples"] == 30
    # The study's teacher reused from a file: no teacher trained.
    again = tmp_path / "again"
    assert main(["frontier", "--dataset", "fashion-mnist", "--quick", "--seeds", "1", "--methods", "kd",
                 "--teacher", str(out / "models" / "teacher.pt"), "--out", str(again), "--no-progress",
                 "--jobs", "1"]) == 0
    reused = json.loads((again / "results.json").read_text())
    assert "train teacher" not in reused["stages"] and reused["teacher"]["path"] == str(out / "models" / "teacher.pt")
    assert main(["frontier", "--dataset", "digits", "--quick", "--teacher", str(out / "models" / "teacher.pt"),
                 "--out", str(tmp_path / "bad")]) == 2  # a 28×28 teacher cannot teach 8×8 digits
