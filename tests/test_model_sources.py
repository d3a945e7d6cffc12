"""Model sources (rkd_fast.model_source) end to end, offline, with small models of each source: timm's test
architectures, torchvision's ShuffleNetV2 ×0.5 at digits' 8×8 inputs, a RobustBench-format file written here.
Students distilled across sources with --feature-pair (maps and ViT tokens), saved, evaluated from the run
directory, exported to safetensors and read back bit-identical; every bad source a one-line error before anything
is written."""

import dataclasses
import sys

import pytest
import torch
from torch import nn

from rkd_fast.cli import main
from rkd_fast.datasets import dataset_info
from rkd_fast.losses import RobustKDLoss
from rkd_fast.model_file import load_model
from rkd_fast.teachers import checkpoint_student, load_any
from rkd_fast.model_source import (SourceError, arch_kwargs, as_feature_map, build_architecture,
                                   default_feature_layer, load_weights, parse_arch)
from rkd_fast.train import checkpoints

from _robustbench_stub import install_robustbench

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("safetensors")

DIGITS = dataset_info("digits")
TV = "torchvision:shufflenet_v2_x0_5"  # 0.35M parameters; its last map is conv5
VIT = "timm:test_vit,patch_size=2"  # 8×8 digits in 2×2 patches: 16 tokens and a class token
FAST = ["--epochs", "1", "--batch-size", "512", "--attack-steps", "1", "--no-progress", "--device", "cpu"]


def _bare_weights(arch, path, seed=0):
    """The state_dict of `arch`'s bare torchvision/timm model (the keys those libraries publish), at `path`."""
    torch.manual_seed(seed)
    model = build_architecture(arch, **arch_kwargs(arch, DIGITS)).model
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def _one_line_error(capsys, command):
    captured = capsys.readouterr()
    assert captured.err.startswith(f"rkd-fast {command}: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.slow
def test_timm_student_from_torchvision_teacher_save_eval_export(tmp_path, capsys):
    weights = _bare_weights(TV, tmp_path / "shufflenet.pth")
    out = tmp_path / "run"
    assert main(["train", "--method", "robust-kd", "--arch", "timm:test_resnet", "--teacher", TV,
                 "--teacher-weights", str(weights), "--feature-pair", "layer4:conv5", "--channels-last",
                 "--out", str(out), *FAST]) == 0
    state = checkpoints.read_checkpoint(out / "best.pt")
    assert state["model"]["arch"] == "timm:test_resnet" and state["model"]["kwargs"]["in_channels"] == 1
    assert state["config"]["feature_pairs"] == [["layer4", "conv5"]]
    assert state["history"][0]["train_feat"] > 0  # the feature term ran, through an adapter (128 → 1024 channels)
    assert state["method"], "the adapter's weights are in the checkpoint"

    # eval takes the run directory (its best.pt): the student rebuilt from its recorded source
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--dataset", "digits", "--n-examples", "20",
                 "--attacks", "clean", "fgsm", "--device", "cpu", "--no-progress"]) == 0
    assert "clean" in capsys.readouterr().out

    # export to safetensors and back: the same weights, bit for bit, and the same outputs
    exported = tmp_path / "student.safetensors"
    assert main(["export", str(out), str(exported), "--format", "safetensors"]) == 0
    student = checkpoint_student(state, out / "best.pt")
    loaded = load_model(exported)
    assert loaded.rkd_info["arch"] == "timm:test_resnet" and loaded.rkd_info["meta"]["method"] == "robust-kd"
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(student(x), loaded(x))
    assert torch.equal(load_any(out)(x), loaded(x)) and torch.equal(load_any(out / "best.pt")(x), loaded(x))
    assert main(["export", str(out), str(tmp_path / "student.pt"), "--format", "safetensors"]) == 2
    assert "name the file OUT.safetensors" in _one_line_error(capsys, "export")
    assert not (tmp_path / "student.pt").exists()


@pytest.mark.slow
def test_torchvision_student_from_timm_vit_teacher_tokens_to_map(tmp_path):
    # synthetic-imagenet at 32×32 (one step of 4 images: bf16 autocast is slow on a CPU), ViT patches of 8×8. Not
    # 16×16: ShuffleNet's stage4 would then run a stride-2 depthwise conv on a 1×1 map, whose bf16 weight gradient
    # oneDNN on CPU fills from uninitialised memory (torch 2.14.1: different each run, sometimes NaN)
    vit = "timm:test_vit,patch_size=8"
    info = dataset_info("synthetic-imagenet")
    torch.manual_seed(0)
    teacher = build_architecture(vit, **arch_kwargs(vit, dataclasses.replace(info, input_size=(32, 32)))).model
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    out = tmp_path / "run"
    assert main(["train", "--method", "robust-kd", "--dataset", "synthetic-imagenet", "--image-size", "32",
                 "--synthetic-batches", "1", "--batch-size", "4", "--val-size", "4", "--arch", TV, "--teacher", vit,
                 "--teacher-weights", str(tmp_path / "vit.safetensors"), "--feature-pair", "conv5:blocks.5",
                 "--precision", "bf16", "--channels-last", "--out", str(out), *FAST[:2], *FAST[4:]]) == 0
    state = checkpoints.read_checkpoint(out / "best.pt")
    # ShuffleNet's conv5 (N, 1024, 1, 1) against the ViT's tokens (N, 17, 64) as a 4×4 grid of 64 channels
    assert state["method"]["loss_fn.adapters.0.proj.weight"].shape == (64, 1024, 1, 1)
    assert state["model"]["kwargs"]["num_classes"] == 1000
    assert torch.isfinite(torch.tensor(state["history"][0]["train_feat"]))


def test_token_sequences_become_maps():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    grid = as_feature_map(tokens, prefix=1)  # the class token dropped, 16 patches as 4×4
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[:, :, 0, 1], tokens[:, 2])
    assert as_feature_map(tokens).shape == (2, 3, 17, 1)  # not a square: a column


def test_default_feature_layers():
    x = torch.zeros(2, 1, 8, 8)
    for arch, layer in (("timm:test_resnet", "layer4"), (VIT, "blocks.5"), (TV, "conv5"),
                        ("torchvision:resnet18", "layer4"), ("small_cnn", "block3")):
        assert default_feature_layer(build_architecture(arch, **arch_kwargs(arch, DIGITS)), x) == layer, arch


def test_layers_lists_modules_with_shapes(capsys):
    assert main(["layers", VIT]) == 0
    out = capsys.readouterr().out
    assert "blocks.5 " in out and "(1, 17, 64)  <- default feature layer" in out
    assert "patch_embed.proj" in out and "(1, 64, 4, 4)" in out


def test_robustbench_format_file(tmp_path, monkeypatch, capsys):
    # RobustBench's layout, model_dir/DATASET/THREAT/NAME.pt, holding a timm model that takes [0, 1] inputs
    path = tmp_path / "cifar10" / "Linf" / "Tiny2026_test_resnet.pt"
    path.parent.mkdir(parents=True)
    make = lambda: timm.create_model("test_resnet", pretrained=False, num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    torch.save(make().state_dict(), path)

    install_robustbench(monkeypatch, make)
    assert main(["layers", "robustbench:cifar10/Linf/Tiny2026_test_resnet", "--model-dir", str(tmp_path),
                 "--dataset", "cifar10"]) == 0
    assert "layer4  " in capsys.readouterr().out


def test_weights_of_another_source_name_it():
    model = build_architecture("resnet18", **arch_kwargs("resnet18", DIGITS))
    import torchvision
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(SourceError, match=r"look like torchvision:resnet18's: use torchvision:resnet18$"):
        load_weights(model, state)
    tv = build_architecture("torchvision:resnet18", **arch_kwargs("torchvision:resnet18", DIGITS))
    load_weights(tv, state)  # the bare model's keys
    assert torch.equal(tv.model.fc.weight, state["fc.weight"])


def test_timm_missing_names_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SourceError, match=r"pip install 'rkd_fast\[timm\]'"):
        parse_arch("timm:test_resnet")
    assert main(["train", "--method", "natural", "--arch", "timm:test_resnet", "--out", str(tmp_path / "run"),
                 *FAST]) == 2
    assert "timm: sources need timm, which is not installed: pip install 'rkd_fast[timm]'" in _one_line_error(
        capsys, "train")
    assert not (tmp_path / "run").exists()


class _TupleTeacher(nn.Module):
    """A teacher whose module ``pair`` returns a tuple (its forward takes the first element)."""

    def __init__(self):
        super().__init__()
        self.pair = _Pair()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.pair(x)[0])


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_layer_whose_output_is_not_a_tensor():
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="feature layer 'pair' of the teacher returns a tuple, not a tensor"):
        RobustKDLoss(student, _TupleTeacher(), feature_pairs=[("0", "pair")], example_input=torch.zeros(2, 1, 8, 8))


@pytest.fixture
def bad_source_files(tmp_path):
    _bare_weights(TV, tmp_path / "shufflenet.pth")
    torch.save({"not": "weights"}, tmp_path / "junk.pt")
    return tmp_path


GOOD = {"--arch": "timm:test_resnet", "--teacher": TV, "--teacher-weights": "{tmp}/shufflenet.pth",
        "--feature-pair": "layer4:conv5"}
BAD_TRAIN = [  # flags replacing the good ones (None: left out), and the error
    ({"--arch": "timm:tst_resnet"}, "unknown timm architecture 'tst_resnet'; did you mean timm:test_resnet"),
    ({"--arch": "resnet19"}, "unknown architecture 'resnet19'; did you mean resnet18"),
    ({"--arch": "mobilenet_v3_small"}, "did you mean torchvision:mobilenet_v3_small"),
    ({"--arch": "{tmp}/shufflenet.pth"}, "the student is an architecture"),
    ({"--teacher-weights": None}, "give its trained weights (--teacher-weights FILE"),
    ({"--teacher": "timm:test_resnet"}, "the weights do not fit timm:test_resnet"),
    ({"--teacher-weights": "{tmp}/junk.pt"}, "is not a plain state_dict"),
    ({"--feature-pair": "layer4:conv6"}, "teacher has no module named 'conv6'; available: 'conv5'"),
    ({"--feature-pair": "layer9:conv5"}, "student has no module named 'layer9'; available: 'layer4'"),
    ({"--arch": "timm:test_vit"}, "does not take inputs of shape (N, 1, 8, 8)"),  # 16×16 patches
]


@pytest.mark.parametrize("change,message", BAD_TRAIN, ids=[str(c) for c, _ in BAD_TRAIN])
def test_bad_source_is_one_line_before_anything_is_written(bad_source_files, capsys, change, message):
    flags = {**GOOD, **change}
    args = [w.format(tmp=bad_source_files) for k, v in flags.items() if v is not None for w in (k, v)]
    out = bad_source_files / "out"
    assert main(["train", "--method", "robust-kd", *args, "--out", str(out), *FAST]) == 2
    assert message in _one_line_error(capsys, "train")
    assert not out.exists()


def test_eval_names_the_source_the_weights_fit(tmp_path, capsys):
    import torchvision
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pth")
    assert main(["eval", "--arch", "resnet18", "--weights", str(tmp_path / "tv.pth"), "--dataset", "digits",
                 "--device", "cpu", "--out", str(tmp_path / "eval")]) == 2
    assert "look like torchvision:resnet18's: use torchvision:resnet18" in _one_line_error(capsys, "eval")
    assert not (tmp_path / "eval").exists()


def test_layers_of_an_unknown_source(capsys):
    assert main(["layers", "timm:no_such_net"]) == 2
    assert "unknown timm architecture 'no_such_net'" in _one_line_error(capsys, "layers")


def test_bench_step_case_with_timm_student_and_teacher():
    # the imagenet-timm scenario's code path (`rkd-fast bench`), at tiny sizes: timm's test ResNet student and
    # test EfficientNet teacher on a synthetic batch, their default feature layers, the step against the cost model
    from rkd_fast.bench import steps

    scenario = steps.Scenario("timm", steps.ModelSpec("timm:test_resnet", {}),
                              steps.ModelSpec("timm:test_efficientnet", {}), 2, 32, variants=("robust-kd",))
    record = steps.run_scenario(scenario, "cpu", attack_steps=1, warmup=0, repeats=1, log=lambda *a: None)
    row = record["steps"]["robust-kd"]
    assert "error" not in row, row
    assert row["ms"] > 0 and row["predicted_ms"] > 0 and row["units"] == {"S_fb": 2, "T_f": 1, "O": 1}
    assert record["student"] == "timm:test_resnet" and record["student_GFLOPs_per_image"]


@pytest.mark.parametrize("weights_channels, model_channels", [(3, 1), (1, 3)])
def test_rgb_weights_fit_a_grey_model_and_back(weights_channels, model_channels):
    # timm's published weights are RGB; a grey data set's timm model takes one channel (and the reverse)
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=10, in_chans=weights_channels, img_size=8, patch_size=2).eval()
    info = dataclasses.replace(DIGITS, in_channels=model_channels, mean=(0.0,) * model_channels,
                               std=(1.0,) * model_channels)
    model = build_architecture(VIT, **arch_kwargs(VIT, info))
    with pytest.warns(UserWarning, match="patch_embed.proj.weight takes "
                                         f"{weights_channels} input channels, the model {model_channels}"):
        load_weights(model, source.state_dict(), VIT)
    grey = torch.rand(2, 1, 8, 8)
    # the same function on a grey image: RGB filters summed, or a grey filter spread over three equal channels
    torch.testing.assert_close(model.model(grey.expand(-1, model_channels, -1, -1)),
                               source(grey.expand(-1, weights_channels, -1, -1)), atol=1e-5, rtol=1e-5)


def test_nhwc_stage_outputs_are_compared_as_maps():
    # timm's MambaOut (like Swin) returns its stages as (N, H, W, C): the feature term permutes them to (N, C, H, W)
    from rkd_fast.model_source import nhwc_maps
    from rkd_fast.ops.feature_distance import feature_distance

    arch = "timm:test_mambaout"
    kwargs = {"num_classes": 10, "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
    torch.manual_seed(0)
    student, teacher = build_architecture(arch, **kwargs), build_architecture(arch, **kwargs)
    assert nhwc_maps(student) and not nhwc_maps(build_architecture(TV, **kwargs))
    x = torch.rand(2, 3, 32, 32)
    loss = RobustKDLoss(student, teacher, feature_pairs=[("stages.2", "stages.2")], example_input=x, ce_weight=0,
                        kd_weight=0, jac_weight=0)
    assert not list(loss.parameters())  # the same maps on both sides: no adapter
    student.eval(), teacher.eval()
    _, terms = loss(x, torch.zeros(2, dtype=torch.long))
    maps = {}
    for name, model in (("s", student), ("t", teacher)):
        handle = model.model.stages[2].register_forward_hook(lambda m, i, o, name=name: maps.__setitem__(name, o))
        with torch.no_grad():
            model(x)
        handle.remove()
    assert maps["s"].shape[-1] == 48  # NHWC: 48 channels last
    expected = feature_distance(maps["s"].permute(0, 3, 1, 2), maps["t"].permute(0, 3, 1, 2), mode="normalized")
    torch.testing.assert_close(terms["feat"], expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_timm_student_trains(tmp_path, monkeypatch):
    # --compile with a timm student and a torchvision teacher: dynamo captures the student's graph and training runs
    # through it. aot_eager (dynamo and AOTAutograd without Inductor's C++ code generation): the same graph capture
    # in about 30 s of CPU instead of minutes; Inductor itself is covered by the trainer's compile tests.
    compile_module = nn.Module.compile
    compiled = []

    def aot_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return compile_module(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(nn.Module, "compile", aot_eager)
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert main(["train", "--method", "robust-kd", "--arch", "timm:test_resnet", "--teacher", TV,
                 "--teacher-weights", str(_bare_weights(TV, tmp_path / "tv.pth")), "--feature-pair", "layer4:conv5",
                 "--compile", "--out", str(out), *FAST]) == 0
    assert compiled
    state = checkpoints.read_checkpoint(out / "best.pt")
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not any(k.startswith("_orig_mod") for k in state["student"])  # compiled in place: the keys stay
    torch._dynamo.reset()
