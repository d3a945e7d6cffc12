"""`rkd-fast bench` end to end in a tiny configuration (so the report code cannot rot), and its pieces."""

import json
import math

import pytest
import torch

from rkd_fast import cli as top_cli
from rkd_fast.bench import cli, report, steps
from rkd_fast.train import methods as methods_module

TINY = ["--quick", "--device", "cpu", "--width", "4", "--wrn-widen", "1", "--batch-size", "2", "--repeats", "1",
        "--warmup", "0", "--attack-steps", "1", "--methods", "natural,kd,robust-kd,robust-kd:clean,robust-kd:exact,pgd-at,ard",
        "--kernel-shapes", "2x4x3x3", "--kernel-impls", "rkd_fast,eager", "--kernel-min-time", "0.01"]


@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "report"
    assert top_cli.main(["bench", *TINY, "--scenarios", "cifar-same,cifar-10x", "--out", str(out)]) == 0
    for name in ("report.md", "report.json", "step_cost.png", "kernels.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    r = json.loads((out / "report.json").read_text())
    assert {"version", "command", "machine", "settings", "scenarios", "targets", "teacher_inference", "kernels",
            "wall_s", "notes", "registered_methods", "missing_methods", "plots"} <= set(r)
    assert r["command"].startswith("rkd-fast bench --quick") and "--width 4" in r["command"]
    assert {"cpu", "cores", "gpu", "torch", "triton", "cuda"} <= set(r["machine"])
    same, big = r["scenarios"]
    assert same["name"] == "cifar-same" and big["name"] == "cifar-10x"
    assert set(same["units_ms"]) == {"S_f", "S_fb", "T_f", "T_fb", "O"}
    # The 10× scenario does not re-measure teacher-free methods other than the natural reference.
    assert "pgd-at" in same["steps"] and "pgd-at" not in big["steps"] and "natural" in big["steps"]
    for scenario in r["scenarios"]:
        assert scenario["teacher_GFLOPs_per_image"] > 0 and scenario["student_GFLOPs_per_image"] > 0
        for name, row in scenario["steps"].items():
            assert "error" not in row, (name, row)
            assert row["ms"] > 0 and row["images_per_s"] > 0 and row["peak_MB"] is None  # CPU: no peak memory
            assert row["predicted_ms"] > 0 and math.isclose(row["measured_over_predicted"],
                                                            row["ms"] / row["predicted_ms"])
            assert row["aten_ops"] > 0 and row["host_ms"] > 0
        # the attack pass makes robust-kd dispatch more ops than a natural step, the training pass as many
        assert scenario["steps"]["robust-kd"]["ops_x_natural"] > 1
        assert scenario["steps"]["natural"]["x_natural"] == 1.0
    assert big["teacher_GFLOPs_per_image"] > big["student_GFLOPs_per_image"]
    ratios = {(t["scenario"], t["ratio"]) for t in r["targets"]}
    assert ("cifar-same", "robust-kd / pgd-at") in ratios and ("cifar-10x", "robust-kd / ard") in ratios
    assert ("cifar-same", "robust-kd aten ops / natural's") in ratios
    assert ("cifar-10x", "robust-kd measured / predicted") in ratios
    # rslad was not asked for: its targets are reported as missing, not as failures
    assert all(t["status"] == "missing" for t in r["targets"] if "rslad" in t["ratio"])
    assert [row["setting"] for row in r["teacher_inference"]["rows"]][:2] == ["no_grad, fp32", "inference_mode, fp32"]
    assert r["kernels"][0]["shape"] == [2, 4, 3, 3] and r["kernels"][0]["copy_GBps"] > 0
    md = (out / "report.md").read_text()
    for heading in ("## Machine", "## Reproduce", "## Training-step cost", "## Targets", "## The price of exactness",
                    "## Teacher inference", "## Kernels"):
        assert heading in md
    assert r["command"] in md


def test_missing_method_is_listed_not_fatal(tmp_path, monkeypatch, request):
    resolve = cli.resolve
    registered = dict(methods_module.METHODS)  # restored in its order: later tests list methods in it
    request.addfinalizer(lambda: (methods_module.METHODS.clear(), methods_module.METHODS.update(registered)))

    def resolve_then_unregister(args):  # ard's cases were chosen, then ard is gone when they run
        cfg = resolve(args)
        del methods_module.METHODS["ard"]
        return cfg

    monkeypatch.setattr(cli, "resolve", resolve_then_unregister)
    out = tmp_path / "r"
    args = cli.build_parser().parse_args([*TINY, "--methods", "natural,ard", "--scenarios", "cifar-same",
                                          "--no-teacher-inference", "--kernel-shapes", "none", "--no-plots",
                                          "--out", str(out)])
    assert cli.run(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["missing_methods"] == ["ard"] and "ard" not in r["scenarios"][0]["steps"]
    assert r["scenarios"][0]["missing"] == ["ard"]
    assert "ard" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--methods", "natural,bogus"], "bogus"),
    (["--scenarios", "imagenet", "--device", "cpu"], "CUDA only"),
    (["--kernel-shapes", "2x3"], "NxCxHxW"),
    (["--batch-size", "0"], "batch-size"),
    (["--kernel-impls", "fast"], "kernel-impls"),
])
def test_bad_options(argv, match, capsys, tmp_path):
    args = cli.build_parser().parse_args([*argv, "--out", str(tmp_path)])
    assert cli.run(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def _one_step(variant):
    """(the step case, whether the student's parameters changed, the teacher) after one step of `variant` on a
    tiny ResNet-18 pair."""
    scenario = steps.Scenario("t", steps.ModelSpec("resnet18", {"width": 4}), steps.ModelSpec("resnet18", {"width": 4}),
                              2, 8)
    torch.manual_seed(0)
    student, teacher = scenario.student.build("cpu", False), scenario.teacher.build("cpu", False)
    x, y = steps.make_batch(scenario, "cpu", False)
    before = [p.detach().clone() for p in student.parameters()]
    case = steps.StepCase(variant, student, teacher, x, y, scenario, attack_steps=1)
    case.step()
    case.close()
    return case, any(not torch.equal(a, b) for a, b in zip(before, student.parameters())), teacher


def test_step_case_trains_the_student():
    case, trained, teacher = _one_step("robust-kd:exact")
    assert case.method.loss_fn.jacobian["estimator"] == "exact"
    assert trained
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("variant", ["fgsm-rs", "n-fgsm", "free-at"])
def test_single_step_baselines_are_step_cases_with_a_cost_model(variant):
    _, trained, _ = _one_step(variant)
    assert trained
    assert steps.cost_units(variant, 10) == {"S_fb": 1 if variant == "free-at" else 2, "O": 1}


def test_cost_units_and_targets():
    assert steps.cost_units("pgd-at", 10) == {"S_fb": 11, "O": 1}
    assert steps.cost_units("unknown", 10) is None
    assert steps.predict_ms({"S_fb": 2, "T_f": 1}, {"S_fb": 3.0, "T_f": 5.0}) == 11.0
    fake = [{"name": "cifar-same", "steps": {"robust-kd": {"ms": 3.0}, "pgd-at": {"ms": 10.0}, "ard": {"ms": 5.0}}}]
    by_ratio = {t["ratio"]: t for t in steps.targets(fake)}
    assert by_ratio["robust-kd / pgd-at"]["status"] == "pass" and by_ratio["robust-kd / ard"]["status"] == "FAIL"
    assert by_ratio["robust-kd / rslad"]["status"] == "missing"


def test_machine_info():
    info = report.machine_info()
    assert info["torch"] == torch.__version__ and info["cores"] >= 1
