"""Model definitions. Every model takes inputs in [0, 1] and returns logits: the input normalisation is
part of the model (an `InputNormalization` first layer), so attacks and the Jacobian term see raw pixels.

`build_model(arch, **kwargs)` builds a registered architecture by name; checkpoints store that name and the
keyword arguments (see `rkd_fast.model_file`)."""

import torch
from torch import nn

from .datasets.spec import CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD

MODELS = {}

# The feature map a method distils by default, per architecture (the last stage before the classifier head).
DEFAULT_FEATURE_LAYER = {"small_cnn": "block3", "preact_resnet18": "layer4", "resnet18": "layer4",
                         "resnet34": "layer4", "resnet50": "layer4", "wide_resnet34_10": "layer3",
                         "mobilenet_v2": "features"}


def register_model(name):
    def add(cls):
        MODELS[name] = cls
        return cls
    return add


def build_model(arch, **kwargs):
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(sorted(MODELS))}")
    model = MODELS[arch](**kwargs)
    # What rkd_fast.save_model stores to rebuild the model (a plain attribute, not part of the state_dict).
    model.rkd_info = {"arch": arch, "kwargs": dict(kwargs)}
    return model


def model_info(model):
    """What rkd_fast knows of `model`, in its one ``rkd_info`` dict: ``arch`` and ``kwargs`` (build_model); with
    ``num_classes``, ``normalization`` and ``meta`` when read from a model file (load_model); with ``spec`` and
    ``source`` when loaded as a teacher (rkd_fast.teachers.load_teacher). Empty for another model."""
    return getattr(model, "rkd_info", {})


def _global_average(x):
    """(N, C, H, W) -> (N, C) mean over positions: global average pooling (ATen lowers
    F.adaptive_avg_pool2d(x, 1) to this mean too, so it is deterministic on CUDA; tests/test_cuda_determinism.py)."""
    return x.mean(dim=(2, 3))


class InputNormalization(nn.Module):
    """(x - mean) / std per channel, as buffers so they follow the model's device and are saved with it."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_block(c_in, c_out, batchnorm, pool):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register_model("small_cnn")
class SmallCNN(nn.Module):
    """A small CNN: three 3×3 conv blocks (the last two halve the side: 8×8 → 4×4 → 2×2 for digits, 28×28 → 14×14
    → 7×7 for Fashion-MNIST) and a two-layer head sized from ``input_size`` (H, W).

    Feature maps worth distilling: ``block1`` (width, H, W), ``block2`` (2·width, H/2, W/2),
    ``block3`` (4·width, H/4, W/4)."""

    def __init__(self, num_classes=10, in_channels=1, width=32, batchnorm=True, mean=DIGITS_MEAN, std=DIGITS_STD,
                 input_size=(8, 8)):
        super().__init__()
        height, width_px = (int(side) // 4 for side in input_size)  # two 2×2 max-pools, flooring as they do
        if height < 1 or width_px < 1:
            raise ValueError(f"small_cnn needs inputs of at least 4×4 pixels, got {tuple(input_size)}")
        self.normalize = InputNormalization(mean, std)
        self.block1 = _conv_block(in_channels, width, batchnorm, pool=False)
        self.block2 = _conv_block(width, 2 * width, batchnorm, pool=True)
        self.block3 = _conv_block(2 * width, 4 * width, batchnorm, pool=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * height * width_px, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(self.normalize(x)))))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv, BN-ReLU-conv, identity or 1×1 shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al., 2015): conv-BN-ReLU, conv-BN, add, ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _CifarResNet(nn.Module):
    """ResNet-18 layout with the CIFAR stem (one 3×3 stride-1 conv, no max-pool): stages ``layer1`` to
    ``layer4`` of two blocks each, widths w, 2w, 4w, 8w, strides 1, 2, 2, 2; global average pool; ``linear``.
    Works on any input size (8×8 digits reach 1×1 at ``layer4``)."""

    def __init__(self, block, preact, num_classes, in_channels, width, mean, std):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        # Post-activation nets normalise the stem output; pre-activation blocks do it themselves.
        self.stem = nn.Identity() if preact else nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        widths = (width, 2 * width, 4 * width, 8 * width)
        c_in = width
        for i, (c_out, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(block(c_in, c_out, stride), block(c_out, c_out, 1)))
            c_in = c_out
        # PreAct nets end with the BN-ReLU their last block did not apply.
        self.final = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.stem(self.conv1(self.normalize(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = _global_average(self.final(out))
        return self.linear(out)


@register_model("preact_resnet18")
class PreActResNet18(_CifarResNet):
    """PreAct-ResNet-18 (the usual adversarial-training baseline), CIFAR stem, normalisation inside."""

    def __init__(self, num_classes=10, in_channels=3, width=64, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__(PreActBlock, True, num_classes, in_channels, width, mean, std)


@register_model("resnet18")
class ResNet18(_CifarResNet):
    """ResNet-18 with the CIFAR stem (3×3 stride-1 first conv, no max-pool), normalisation inside."""

    def __init__(self, num_classes=10, in_channels=3, width=64, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__(BasicBlock, False, num_classes, in_channels, width, mean, std)


# --- larger architectures: ResNet-34/50, WRN-34-10, MobileNetV2 ---------------------------------------------

STEMS = ("cifar", "imagenet")


def _default_stats(stem, mean, std):
    # The statistics of the data set a stem is meant for, unless given.
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    default_mean, default_std = (CIFAR10_MEAN, CIFAR10_STD) if stem == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    return mean if mean is not None else default_mean, std if std is not None else default_std


def _init_weights(model):
    """torchvision's initialisation: He (fan-out) for convolutions, BN to identity, small normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 reduce, 3×3, 1×1 expand ×4), stride on the 3×3 conv as in torchvision ("v1.5")."""

    expansion = 4

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        mid = c_out // self.expansion
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    """ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with four stages
    ``layer1``..``layer4`` of `blocks` blocks (strides 1, 2, 2, 2), global average pool and ``linear``.

    stem="imagenet": 7×7 stride-2 conv, BN, ReLU, 3×3 stride-2 max-pool (224×224 inputs); stem="cifar": one
    3×3 stride-1 conv, BN, ReLU (32×32 inputs)."""

    def __init__(self, block, blocks, num_classes, stem, in_channels, width, mean, std):
        super().__init__()
        mean, std = _default_stats(stem, mean, std)
        self.normalize = InputNormalization(mean, std)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        pool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.stem = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), pool)
        expansion = getattr(block, "expansion", 1)
        c_in = width
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            c_out = width * 2 ** i * expansion
            stage = [block(c_in, c_out, stride)] + [block(c_out, c_out, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.linear = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x):
        out = self.stem(self.conv1(self.normalize(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(_global_average(out))


@register_model("resnet34")
class ResNet34(_ResNet):
    """ResNet-34 (He et al., 2016): basic blocks (3, 4, 6, 3). 21.8M parameters with the ImageNet stem and
    1000 classes, 21.3M with the CIFAR stem and 10 classes."""

    def __init__(self, num_classes=10, stem="cifar", in_channels=3, width=64, mean=None, std=None):
        super().__init__(BasicBlock, (3, 4, 6, 3), num_classes, stem, in_channels, width, mean, std)


@register_model("resnet50")
class ResNet50(_ResNet):
    """ResNet-50 (He et al., 2016): bottleneck blocks (3, 4, 6, 3), stride on the 3×3 conv (torchvision's
    layout). 25.6M parameters with the ImageNet stem and 1000 classes, 23.5M with the CIFAR stem and 10."""

    def __init__(self, num_classes=10, stem="cifar", in_channels=3, width=64, mean=None, std=None):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, stem, in_channels, width, mean, std)


@register_model("wide_resnet34_10")
class WideResNet34_10(nn.Module):
    """WRN-34-10 (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) as used in robust training
    (Madry et al., 2018; Zhang et al., TRADES, 2019): CIFAR stem (3×3 conv to 16 channels), three stages
    ``layer1``..``layer3`` of (34 - 4) / 6 = 5 pre-activation blocks of widths 160, 320, 640 (strides 1, 2, 2),
    final BN-ReLU, global average pool, ``linear``. 46.2M parameters with 10 classes."""

    def __init__(self, num_classes=10, in_channels=3, depth=34, widen_factor=10, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        c_in = 16
        for i, stride in enumerate((1, 2, 2)):
            c_out = 16 * widen_factor * 2 ** i
            stage = [PreActBlock(c_in, c_out, stride)] + [PreActBlock(c_out, c_out, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.final = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU())
        self.linear = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x)))))
        out = _global_average(self.final(out))
        return self.linear(out)


def _conv_bn_relu6(c_in, c_out, kernel, stride, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (×t), 3×3 depthwise, 1×1 linear projection; residual when shapes match."""

    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(c_in, hidden, 1, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


@register_model("mobilenet_v2")
class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018),
    width 1.0: 3.5M parameters with 1000 classes (2.2M with 10).

    stem="imagenet": the paper's network (first conv stride 2, 224×224 inputs). stem="cifar": first conv and
    the second stage at stride 1 (the common CIFAR adaptation), so 32×32 inputs reach 4×4, not 1×1.
    ``features`` ends in the 1×1 conv to 1280 channels; ``classifier`` is dropout then the linear layer."""

    # (expansion t, channels c, repeats n, first stride s) of the paper's Table 2.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes=10, stem="cifar", in_channels=3, dropout=0.2, mean=None, std=None):
        super().__init__()
        mean, std = _default_stats(stem, mean, std)
        self.normalize = InputNormalization(mean, std)
        cifar = stem == "cifar"
        layers = [_conv_bn_relu6(in_channels, 32, 3, 1 if cifar else 2)]
        c_in = 32
        for i, (t, c, n, s) in enumerate(self.SETTINGS):
            s = 1 if cifar and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(c_in, c, s if j == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn_relu6(c_in, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        _init_weights(self)

    def forward(self, x):
        out = self.features(self.normalize(x))
        return self.classifier(_global_average(out))
