"""The larger architectures: shapes, channels_last, parameter counts against the published values, torchvision
parity where torchvision has the same network, and torch.compile(fullgraph=True) tracing."""

import pytest
import torch

from rkd_fast.models import MODELS, InputNormalization, build_model

# (arch, kwargs, input size, parameter count). Published counts: torchvision's model docs (ResNet-34 21,797,672,
# ResNet-50 25,557,032, MobileNetV2 3,504,872); WRN-34-10 46,160,474 as in the TRADES / RobustBench code;
# ResNet-18 with the CIFAR stem 11,173,962.
CASES = [
    ("resnet18", {}, 32, 11_173_962),
    ("resnet34", {}, 32, 21_282_122),
    ("resnet34", {"stem": "imagenet", "num_classes": 1000}, 64, 21_797_672),
    ("resnet50", {}, 32, 23_520_842),
    ("resnet50", {"stem": "imagenet", "num_classes": 1000}, 64, 25_557_032),
    ("wide_resnet34_10", {}, 32, 46_160_474),
    ("mobilenet_v2", {}, 32, 2_236_682),
    ("mobilenet_v2", {"stem": "imagenet", "num_classes": 1000}, 64, 3_504_872),
]


@pytest.mark.parametrize("arch, kwargs, size, params", CASES, ids=[f"{a}-{k.get('stem', 'cifar')}" for a, k, _, _ in CASES])
def test_builds_forwards_and_counts(arch, kwargs, size, params):
    model = build_model(arch, **kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert isinstance(next(model.children()), InputNormalization)  # takes [0, 1] pixels
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, kwargs.get("num_classes", 10)) and torch.isfinite(out).all()
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, tv_name", [("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2")])
def test_imagenet_stem_matches_torchvision(arch, tv_name):
    # Same layers in the same order: copy torchvision's (randomly initialised) weights across, compare logits.
    tv_models = pytest.importorskip("torchvision.models")
    reference = getattr(tv_models, tv_name)(num_classes=1000).eval()
    ours = build_model(arch, stem="imagenet", num_classes=1000).eval()
    ours_sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    ref_sd = reference.state_dict()
    assert [v.shape for v in ours_sd.values()] == [v.shape for v in ref_sd.values()]
    ours.load_state_dict(dict(zip(ours_sd, ref_sd.values())), strict=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(ours.normalize(x)), rtol=1e-4, atol=1e-4)


def test_stem_changes_resolution_and_bad_stem_is_rejected():
    # ImageNet stem: /4 before layer1; CIFAR stem: full resolution.
    feats = {}
    for stem in ("cifar", "imagenet"):
        model = build_model("resnet34", stem=stem, width=8).eval()
        model.layer1.register_forward_hook(lambda m, i, o, stem=stem: feats.__setitem__(stem, o.shape))
        with torch.no_grad():
            model(torch.rand(1, 3, 32, 32))
    assert feats["cifar"][-1] == 32 and feats["imagenet"][-1] == 8
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet50", stem="tiny")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wide_resnet34_10", depth=30)
    assert {"resnet34", "resnet50", "wide_resnet34_10", "mobilenet_v2"} <= set(MODELS)


@pytest.mark.slow
def test_compile_fullgraph_without_breaks():
    model = build_model("mobilenet_v2").eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
