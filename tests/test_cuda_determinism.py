"""`--deterministic` on a GPU, checked without one.

Under `torch.use_deterministic_algorithms(True)` some CUDA kernels raise instead of running (torch's docstring of
that function lists them: adaptive pooling and interpolation backwards, reflection padding, nll_loss2d, ...).
Which aten ops a training step calls does not depend on the device, so a CPU run shows them: every path the
trainer, the Jacobian term and the attacks take is recorded here under a TorchDispatchMode, and an op that would
raise on CUDA fails the test with its name. (Found the hard way: two `--deterministic` runs failed on the H100
through `F.adaptive_avg_pool2d`'s backward in the feature adapter, since replaced by matrix products.)"""

import pytest
import torch
import torch.nn.functional as F
from _digits_model import save_teacher
from test_trainer import FAST
from torch.utils._python_dispatch import TorchDispatchMode

from rkd_fast import attacks, jacobian_penalty
from rkd_fast.model_file import save_model
from rkd_fast.losses import FeatureAdapter
from rkd_fast.models import MODELS, build_model
from rkd_fast.train import train_model
from rkd_fast.train.methods import METHODS, teacher_methods

aten = torch.ops.aten


def _always(args, kwargs):
    return True


# aten op -> when it raises on CUDA under deterministic algorithms (torch 2.11-2.14 docs and kernels).
REFUSED_ON_CUDA = {
    **{op: _always for op in (
        aten.avg_pool3d_backward, aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
        aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward, aten.fractional_max_pool2d_backward,
        aten.fractional_max_pool3d_backward, aten.max_unpool2d, aten.max_unpool3d, aten.upsample_linear1d_backward,
        aten.upsample_bilinear2d_backward, aten.upsample_bicubic2d_backward, aten.upsample_trilinear3d_backward,
        aten._upsample_bilinear2d_aa_backward, aten._upsample_bicubic2d_aa_backward, aten.reflection_pad1d_backward,
        aten.reflection_pad2d_backward, aten.reflection_pad3d_backward, aten._ctc_loss_backward, aten.put,
        aten.put_, aten.histc, aten.grid_sampler_2d_backward, aten.grid_sampler_3d_backward)},
    # nll_loss2d reduces with atomics unless reduction is "none" (0).
    aten.nll_loss2d_forward: lambda args, kwargs: args[3] != 0,
    aten.bincount: lambda args, kwargs: (args[1] if len(args) > 1 else kwargs.get("weights")) is not None,
    aten.median: lambda args, kwargs: len(args) > 1 or "dim" in kwargs,  # the variant returning indices
    aten.nanmedian: lambda args, kwargs: len(args) > 1 or "dim" in kwargs,
    aten.scatter_reduce: lambda args, kwargs: args[4] == "prod",
    aten.scatter_reduce_: lambda args, kwargs: args[4] == "prod",
}


class RecordRefused(TorchDispatchMode):
    """Runs every op as usual; keeps the names of those REFUSED_ON_CUDA would refuse."""

    def __init__(self):
        super().__init__()
        self.refused = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        refuses = REFUSED_ON_CUDA.get(func.overloadpacket)
        if refuses is not None and refuses(args, kwargs):
            self.refused.add(str(func))
        return func(*args, **kwargs)


def _refused_ops(fn):
    with RecordRefused() as mode:
        fn()
    return mode.refused


def test_the_recorder_sees_what_cuda_refuses():
    # The ops the feature adapter used before it resized by matrix products, and a spatial nll_loss.
    x = torch.randn(2, 3, 4, 4, requires_grad=True)

    def old_adapter():
        F.adaptive_avg_pool2d(x, 2).sum().backward()
        F.interpolate(x, size=6, mode="bilinear").sum().backward()
        F.cross_entropy(x, torch.zeros(2, 4, 4, dtype=torch.long))

    assert _refused_ops(old_adapter) == {"aten._adaptive_avg_pool2d_backward.default",
                                         "aten.upsample_bilinear2d_backward.default",
                                         "aten.nll_loss2d_forward.default"}
    assert _refused_ops(lambda: F.cross_entropy(x, torch.zeros(2, 4, 4, dtype=torch.long), reduction="none")) == set()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_deterministic_cuda_ops(tmp_path, method):
    teacher = {"teacher": str(save_teacher(tmp_path / "t.pt"))} if method in teacher_methods() else {}
    pairs = {"feature_pairs": ("block2:block3",)} if method == "robust-kd" else {}  # an adapter that resizes
    assert _refused_ops(lambda: train_model(method=method, **teacher, **pairs, **FAST)) == set()


def test_robust_kd_with_batchnorm_students_uses_deterministic_cuda_ops(tmp_path):
    # ResNet-50 (ImageNet stem) student and teacher: the Jacobian term's two-call BatchNorm scheme, global pooling.
    teacher = build_model("resnet50", num_classes=1000, stem="imagenet", width=2)
    path = tmp_path / "teacher.pt"
    save_model(teacher, path)

    def run():
        train_model(method="robust-kd", dataset="synthetic-imagenet", arch="resnet50", width=2, teacher=str(path),
                    image_size=64, synthetic_batches=1, batch_size=4, val_size=4, epochs=1, attack_steps=1,
                    progress=False, device="cpu", deterministic=True)

    assert _refused_ops(run) == set()


SMALL_INPUT = {"small_cnn": (1, 8)}  # (channels, size); the rest take 3-channel 32×32 images


# The library's architectures, not those other test modules register (small_cnn_nobn, by _ddp_worker): the set
# must not depend on which test files were collected first.
LIBRARY_MODELS = sorted(name for name, builder in MODELS.items() if builder.__module__.startswith("rkd_fast."))


@pytest.mark.parametrize("arch", LIBRARY_MODELS)
def test_every_architecture_and_the_feature_adapter_use_deterministic_cuda_ops(arch):
    kwargs = {"widen_factor": 1} if arch == "wide_resnet34_10" else {"width": 4} if arch != "mobilenet_v2" else {}
    channels, size = SMALL_INPUT.get(arch, (3, 32))
    model = build_model(arch, **kwargs)
    x = torch.rand(2, channels, size, size)
    shrink, grow = FeatureAdapter((2, 4, 5, 5), (2, 6, 3, 3)), FeatureAdapter((2, 4, 3, 3), (2, 6, 5, 5))

    def step():
        model(x).sum().backward()
        shrink(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
        grow(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()
        jacobian_penalty(model, x, torch.zeros(2, dtype=torch.long), direction="grad").backward()

    assert _refused_ops(step) == set()


def test_attacks_use_deterministic_cuda_ops():
    torch.manual_seed(0)
    model = build_model("small_cnn", width=4).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)

    def run():
        attacks.fgsm(model, x, y, 0.1)
        attacks.pgd(model, x, y, 0.1, 0.05, 2, restarts=2)
        attacks.pgd(model, x, y, 0.5, 0.2, 2, norm="l2")
        attacks.cw_linf(model, x, y, 0.1, 0.05, 2)

    assert _refused_ops(run) == set()
