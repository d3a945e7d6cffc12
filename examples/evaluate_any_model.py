"""Evaluate any PyTorch model: a torchvision ResNet-18 with its normalisation put inside it, under PGD and
AutoAttack's attacks (through pyautoattack), with rkd_fast.evaluate.

The attacks expect a model that takes inputs in [0, 1] and returns logits, so the usual `Normalize(mean, std)`
of the data pipeline moves into the model (rkd_fast.attacks.eval_inputs.with_normalization). Here the ResNet is
adapted to 8×8 grey digits and trained for two epochs first, so that the numbers mean something; for a
torchvision or RobustBench model with its own weights, the command line does the same without code:

    rkd-fast eval --arch torchvision:resnet50 --weights resnet50.pth --dataset imagenet --data-dir /data/imagenet
    rkd-fast eval --checkpoint robustbench:cifar10/Linf/Carmon2019Unlabeled --model-dir models --dataset cifar10 ...

Runs in under a minute on a CPU:  python examples/evaluate_any_model.py
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import rkd_fast
from rkd_fast.attacks.eval_inputs import with_normalization
from rkd_fast.datasets import DIGITS_MEAN, DIGITS_STD, load_digits, stratified_split

EPS = 0.1  # L∞ radius on the [0, 1] pixel scale


def digits_resnet18():
    """torchvision's ResNet-18 for 1×8×8 inputs: a 3×3 single-channel stem and no max-pool (the usual small-image
    change), behind the normalisation of the digits' pixels."""
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return with_normalization(net, DIGITS_MEAN, DIGITS_STD)


def main():
    torch.manual_seed(0)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")

    model = digits_resnet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        model.train()
        for index in torch.randperm(len(x_train)).split(128):
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()

    # AutoAttack through pyautoattack: here its first attack alone, APGD-CE (5 restarts of 100 steps, AutoAttack's
    # own settings for a custom list, "autoattack:apgd-ce+apgd-t" for more); "autoattack" runs the standard version
    # (APGD-CE, APGD-T on 9 target classes, FAB-T and the 5,000-query Square attack): minutes on a CPU. A fixed
    # class-stratified subset of the test split keeps it short; rkd-fast eval --n-examples picks the same subset.
    subset = stratified_split(y_test, 50)[1]
    x, y = x_test[subset], y_test[subset]
    attacks = ["clean", "pgd20", "autoattack:apgd-ce"]
    results = rkd_fast.evaluate(model, (x, y), attacks=attacks, eps=EPS)
    print(f"naturally trained torchvision ResNet-18, {len(y)} test digits, L∞ eps = {EPS}:")
    for name, accuracy in results.items():
        print(f"  {name:<20}{accuracy:7.1%}")
    # L2, the other threat model PGD and AutoAttack cover (FGSM is L∞ only).
    l2 = rkd_fast.evaluate(model, (x, y), attacks=["clean", "pgd20"], eps=0.5, norm="l2")
    print(f"  L2 eps = 0.5: pgd20 {l2['pgd20']:.1%}")


if __name__ == "__main__":
    main()
