"""Model definitions. Every model takes inputs in [0, 1] and returns logits: the input normalisation is
part of the model (an `InputNormalization` first layer), so attacks and the Jacobian term see raw pixels.

`build_model(arch, **kwargs)` builds a registered architecture by name; checkpoints store that name and the
keyword arguments (see `rkd_fast.checkpoint`)."""

import torch
from torch import nn

from .data import DIGITS_MEAN, DIGITS_STD

MODELS = {}


def register_model(name):
    def add(cls):
        MODELS[name] = cls
        return cls
    return add


def build_model(arch, **kwargs):
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(sorted(MODELS))}")
    model = MODELS[arch](**kwargs)
    # What rkd_fast.save_model stores to rebuild the model (plain attributes, not part of the state_dict).
    model.rkd_arch, model.rkd_kwargs = arch, dict(kwargs)
    return model


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
    """A small CNN for 8×8 digits: three 3×3 conv blocks (8×8 → 4×4 → 2×2) and a two-layer head.

    Feature maps worth distilling: ``block1`` (width, 8, 8), ``block2`` (2·width, 4, 4),
    ``block3`` (4·width, 2, 2)."""

    def __init__(self, num_classes=10, in_channels=1, width=32, batchnorm=True, mean=DIGITS_MEAN, std=DIGITS_STD):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.block1 = _conv_block(in_channels, width, batchnorm, pool=False)
        self.block2 = _conv_block(width, 2 * width, batchnorm, pool=True)
        self.block3 = _conv_block(2 * width, 4 * width, batchnorm, pool=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 4, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(self.normalize(x)))))


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


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
        out = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.final(out), 1), 1)
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
