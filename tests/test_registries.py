"""A method or an architecture registered at run time (as a user's own module would) appears everywhere one
should: the `rkd-fast train` flags and help, run.json and its `--config` rerun, the bench's step cases, the demo's
--all and the study's entries (a baseline); and its options are refused where they do not apply."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rkd_fast.bench import cli as bench_cli
from rkd_fast.bench import steps
from rkd_fast.cli import build_parser, main
from rkd_fast.models import MODELS, InputNormalization, build_model, register_model
from rkd_fast.train import TrainConfig, make_config, train_model
from rkd_fast.train.cli import config_from_args
from rkd_fast.train.methods import (Method, RunSettings, create, default_study_variants, register, resolve_options,
                                   study_variants, unregister)
from rkd_fast.train.options import Option

TINY = ["--epochs", "1", "--width", "4", "--batch-size", "256", "--attack-steps", "1", "--no-progress"]


class Toy(Method):
    """Cross-entropy scaled by --toy-scale-factor, with label smoothing 0.1 when --toy-smooth."""

    name = "toy"
    OPTIONS = (Option("toy_scale", 1.0, "toy: weight of the cross-entropy", strict=True, flag="--toy-scale-factor"),
               Option("toy_smooth", False, "toy: label smoothing 0.1", type=bool))
    BENCH_VARIANTS = {"smooth": {"toy_smooth": True}}

    def forward(self, x, y, step_seed):
        with self.autocast():
            logits = self.student(x).float()
        loss = self.opt.toy_scale * F.cross_entropy(logits, y, label_smoothing=0.1 if self.opt.toy_smooth else 0.0)
        return loss, {"ce": loss.detach(), "total": loss.detach()}

    @classmethod
    def cost_units(cls, opt, attack_steps):
        return {"S_fb": 1}


@pytest.fixture
def toy():
    register(Toy)
    yield Toy
    unregister("toy")


def _config(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def _help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out


def test_toy_method_options_are_config_fields_and_flags(toy, capsys):
    cfg = _config(["--method", "toy", "--toy-scale-factor", "0.5", "--toy-smooth", "--out", "x"])
    assert (cfg.method, cfg.toy_scale, cfg.toy_smooth) == ("toy", 0.5, True)
    assert cfg == make_config(method="toy", toy_scale=0.5, toy_smooth=True, out="x")
    assert TrainConfig().toy_scale == 1.0 and TrainConfig().toy_smooth is False
    assert _config(["--method", "toy", "--no-toy-smooth", "--out", "x"]).toy_smooth is False
    text = _help(capsys)
    assert "--toy-scale-factor" in text and "--toy-smooth, --no-toy-smooth" in text and "toy options" in text
    assert "toy" in text.split("\n  --method")[1].split("\n  --dataset")[0].split("}")[0]  # a --method choice


def test_toy_method_options_are_refused_where_they_do_not_apply(toy, tmp_path, capsys):
    for argv, message in (
            (["--method", "natural", "--toy-scale-factor", "0.5"], "--toy-scale-factor applies to --method toy, "
                                                                   "not 'natural'"),
            (["--method", "natural", "--toy-smooth"], "--toy-smooth applies to --method toy, not 'natural'"),
            (["--method", "toy", "--toy-scale-factor", "0"], "toy_scale must be > 0")):
        assert main(["train", *argv, *TINY, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="toy_smooth must be True or False"):
        make_config(method="toy", toy_smooth=1)
    with pytest.raises(ValueError, match="--toy-smooth applies to --method toy"):
        make_config(method="pgd-at", toy_smooth=True)


def test_toy_method_trains_records_and_reruns(toy, tmp_path):
    out = tmp_path / "first"
    assert main(["train", "--method", "toy", "--toy-scale-factor", "0.5", "--toy-smooth", *TINY,
                 "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["config"]["toy_scale"], record["config"]["toy_smooth"]) == (0.5, True)
    command = record["command"]
    assert command[command.index("--toy-scale-factor") + 1] == "0.5" and "--toy-smooth" in command
    assert "--toy-scale" not in command  # the option's own flag, not its field's name
    # the recorded command and the record rebuild the same config
    assert _config(command[2:]) == _config(["--config", str(out), "--out", str(out)])
    rerun = _config(["--config", str(out / "run.json"), "--out", "new"])
    assert (rerun.method, rerun.toy_scale, rerun.toy_smooth) == ("toy", 0.5, True)
    assert _config(["--config", str(out), "--no-toy-smooth", "--out", "new"]).toy_smooth is False


def test_toy_method_is_a_bench_case(toy):
    cases = steps.variants()
    assert cases["toy"] == ("toy", {}) and cases["toy:smooth"] == ("toy", {"toy_smooth": True})
    assert steps.cost_units("toy:smooth", attack_steps=1) == {"S_fb": 1, "O": 1}
    assert "toy:smooth" in bench_cli.build_parser().format_help()
    args = bench_cli.build_parser().parse_args(["--device", "cpu"])
    assert {"toy", "toy:smooth"} <= set(bench_cli.resolve(args)["variants"])
    spec = steps.ModelSpec("resnet18", {"width": 4})
    scenario = steps.Scenario("tiny", spec, spec, 2, 8)
    assert "toy:smooth" in scenario.variants
    student = spec.build("cpu", False)
    x, y = steps.make_batch(scenario, "cpu", False)
    case = steps.StepCase("toy:smooth", student, spec.build("cpu", False), x, y, scenario, attack_steps=1)
    before = [p.detach().clone() for p in student.parameters()]
    case.step()
    assert case.method.opt.toy_smooth
    assert not any(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_unregistered_method_leaves_no_trace(toy):
    unregister("toy")
    try:
        assert "toy_scale" not in {f for f in TrainConfig.__dataclass_fields__} and "toy" not in steps.variants()
        with pytest.raises(TypeError, match="unknown training option"):
            make_config(toy_scale=0.5)
    finally:
        register(Toy)


@pytest.fixture
def toy_arch(monkeypatch):
    @register_model("toy_mlp")
    class ToyMLP(nn.Sequential):
        def __init__(self, num_classes=10, in_channels=1, width=8, mean=(0.5,), std=(0.5,)):
            super().__init__(InputNormalization(mean, std), nn.Flatten(), nn.Linear(in_channels * 8 * 8, width),
                             nn.ReLU(), nn.Linear(width, num_classes))  # digits: 8×8

    yield "toy_mlp"
    monkeypatch.delitem(MODELS, "toy_mlp")


def test_toy_architecture_is_an_arch_choice_and_trains(toy_arch, tmp_path, capsys):
    text = _help(capsys)
    assert "toy_mlp" in text.split("\n  --arch ARCH")[1].split("\n  --width")[0]  # its help line
    assert _config(["--method", "natural", "--arch", "toy_mlp", "--out", "x"]).arch == "toy_mlp"
    result = train_model(method="natural", arch="toy_mlp", epochs=1, width=4, batch_size=256, attack_steps=1,
                         progress=False)
    assert result.model.rkd_info["arch"] == "toy_mlp" and len(result.metrics) == 1
    with pytest.raises(ValueError, match="unknown architecture 'toy_cnn'; known: .*toy_mlp"):
        make_config(method="natural", arch="toy_cnn")


def test_every_method_config_round_trips_through_run_json_and_its_command():
    """A config differing from the defaults in a method option of each kind (a repeatable flag with its own name,
    a choice, a number) comes back the same from its run.json form and from its command line."""
    from rkd_fast.train.config import command_line

    cfg = make_config(method="robust-kd", teacher="t.pt", feature_pairs=["block2:block3"], distill_at="clean",
                      jac_weight=0.5, out="x")
    record = json.loads(json.dumps(cfg.to_dict()))
    assert record["feature_pairs"] == [["block2", "block3"]]
    assert make_config(record) == cfg
    words = command_line(cfg)
    assert words[words.index("--feature-pair") + 1] == "block2:block3" and "--feature-pairs" not in words
    assert _config([*words[2:], "--out", "x"]) == cfg


def test_bench_variants_are_not_inherited(toy):
    class ToySub(Toy):
        name = "toy-sub"

    register(ToySub)
    try:
        assert "toy-sub" in steps.variants() and "toy-sub:smooth" not in steps.variants()
    finally:
        unregister("toy-sub")


class ToyBaseline(Toy):
    """The toy method declared a baseline, with a study variant of its own."""

    name = "toy-baseline"
    baseline = True
    STUDY_VARIANTS = {"toy-baseline:smooth": {"toy_smooth": True}}


def test_toy_baseline_is_in_the_demo_and_the_study(capsys):
    from rkd_fast import demo, frontier

    register(ToyBaseline)
    try:
        assert "toy-baseline" in demo.model_names(all_baselines=True)
        assert "toy-baseline" not in demo.model_names(all_baselines=False)
        assert frontier.study_config(study_variants()["toy-baseline:smooth"], {"student_width": 4, "student_epochs": 1},
                                     {"seed": 0, "eps": 0.1}, None)["toy_smooth"] is True
        assert {"toy-baseline", "toy-baseline:smooth"} <= set(default_study_variants())
        for command in ("demo", "frontier"):
            with pytest.raises(SystemExit):
                main([command, "--help"])
            assert "toy-baseline" in capsys.readouterr().out
    finally:
        unregister("toy-baseline")
    assert "toy-baseline" not in demo.model_names(all_baselines=True) and "toy-baseline" not in study_variants()


def test_a_data_set_s_method_defaults_apply_on_it_only(monkeypatch, capsys):
    """DatasetInfo.method_defaults: over the method's DEFAULTS on that data set, under what the user gives, in the
    help; every data set's entries name a method and options of it."""
    from rkd_fast.datasets import DATASETS
    from rkd_fast.train.methods import METHODS

    for name, info in DATASETS.items():
        for method, given in info.method_defaults.items():
            assert method in METHODS and set(given) <= set(METHODS[method].options()), (name, method)
            config = make_config(method=method, dataset=name, teacher="t.pt")
            assert {k: getattr(config, k) for k in given} == given
    monkeypatch.setitem(DATASETS["digits"].method_defaults, "robust-kd", {"ce_weight": 0.5, "teacher_at": "clean"})
    config = make_config(method="robust-kd", teacher="t.pt")
    assert (config.ce_weight, config.teacher_at, config.kd_weight) == (0.5, "clean", 1.0)  # kd_weight: the method's
    assert make_config(method="robust-kd", teacher="t.pt", ce_weight=2.0).ce_weight == 2.0  # the user's value wins
    assert make_config(method="kd", teacher="t.pt").ce_weight == 1.0  # another method: its own
    assert _config(["--method", "robust-kd", "--teacher", "t.pt", "--out", "run"]).ce_weight == 0.5
    assert "robust-kd on digits: ce_weight 0.5" in " ".join(_help(capsys).split())
    # the Python API's methods read the same table: resolve_options / create given the data set, the method's alone
    # without one
    assert resolve_options("robust-kd", {}, "digits").ce_weight == 0.5
    assert resolve_options("robust-kd", {}).ce_weight == 1.0
    assert resolve_options("robust-kd", {"ce_weight": 2.0}, "digits").ce_weight == 2.0
    student, teacher = build_model("small_cnn", width=4), build_model("small_cnn", width=4)
    run = RunSettings(eps=0.1, alpha=None, attack_steps=1, precision="fp32", label_smoothing=0.0, batch_size=2,
                      arch="small_cnn", teacher_arch="small_cnn")
    made = [create("robust-kd", student, teacher, run, torch.rand(2, 1, 8, 8), contextlib.nullcontext, **given).opt
            for given in ({"dataset": "digits"}, {})]
    assert (made[0].ce_weight, made[0].teacher_at, made[1].ce_weight, made[1].teacher_at) == (0.5, "clean", 1.0,
                                                                                              "student")

