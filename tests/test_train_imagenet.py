"""`rkd-fast train` on the streaming data sets (rkd_fast.datasets.run_data): a tiny generated ImageFolder tree
(test_datasets._make_image_folder: 2 classes, JPEGs of about 30×40) trained at --image-size 16 on CPU, its
mid-epoch resume (bit-identical, whatever the number of DataLoader workers), the sharding contract of its
loader, the capped val split, the errors of a bad --data-dir, synthetic-imagenet with a robust-kd teacher, and
two processes under torchrun training like one."""

import contextlib
import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from rkd_fast.model_file import read_model_file, save_model
from rkd_fast.cli import main
from rkd_fast import datasets
from rkd_fast.models import build_model
from rkd_fast.train import checkpoints, distributed, make_config
from rkd_fast.train.validation import robust_accuracy
from test_datasets import _epoch, _make_image_folder

TINY = ["--arch", "resnet18", "--width", "4", "--image-size", "16", "--attack-steps", "1", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _make_image_folder(root, n_per_class=4)  # train/ and val/: cat, dog × 4 images each
    return root


def _train(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DataLoader/pin-memory notices on a machine without CUDA
        return main(["train", *args])


def _weights(out, step):
    return checkpoints.read_checkpoint(checkpoints.checkpoint_path(out, step))["student"]


@pytest.mark.slow
def test_imagenet_run_files_export_and_bit_identical_resume(folder, tmp_path):
    # 8 train images at batch 3: 3 steps per epoch (3, 3, 2), a checkpoint after every step (global steps 1..6).
    args = ["--method", "natural", "--dataset", "imagenet", "--data-dir", str(folder), "--epochs", "2",
            "--batch-size", "3", "--ckpt-every", "1", "--keep", "10", "--deterministic", "--seed", "1", *TINY]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _train([*args, "--num-workers", "0", "--out", str(whole)]) == 0
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "imagenet" and metrics["config"]["image_size"] == 16
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert all(0 <= row["val_robust_acc"] <= row["val_clean_acc"] <= 1 for row in metrics["epochs"])
    assert (whole / "best.pt").is_file() and (whole / "metrics.csv").is_file() and (whole / "run.json").is_file()
    state = checkpoints.read_checkpoint(whole / "best.pt")
    assert state["model"]["num_classes"] == 2  # the class folders, not ImageNet's 1000
    assert main(["export", str(whole), str(tmp_path / "model.pt")]) == 0
    assert read_model_file(tmp_path / "model.pt")["num_classes"] == 2

    # Stopped after step 1 of epoch 2, resumed with DataLoader workers: the same crops, the same weights.
    shutil.copytree(whole, resumed)
    for step, path in checkpoints.list_checkpoints(resumed):
        if step > 4:
            path.unlink()
    assert _train([*args, "--num-workers", "1", "--out", str(resumed), "--resume"]) == 0
    a, b = _weights(whole, 6), _weights(resumed, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_loader_shards_the_global_batch(folder):
    # Rank r's batch k is the [r::2] share of the single process's batch k, crops and flips included, also from
    # a resumed position; the last global batch (2 of 8 samples) is short and nothing is dropped.
    def loader(batch, rank=0, world=1):
        return datasets.ImageFolderLoader(folder, "train", batch, num_workers=0, seed=5, rank=rank,
                                          world_size=world, drop_last=False, pin_memory=False,
                                          transform=datasets.imagenet_transform("train", 16))

    single, shards = loader(6), [loader(3, r, 2) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 2
    for start in (0, 1):
        whole = _epoch(single, 1, start)
        parts = [_epoch(s, 1, start) for s in shards]
        for k, (x, y) in enumerate(whole):
            merged_x, merged_y = torch.empty_like(x), torch.empty_like(y)
            for r in range(2):
                merged_x[r::2], merged_y[r::2] = parts[r][k]
            assert torch.equal(merged_x, x) and torch.equal(merged_y, y)
    labels = torch.cat([y for _, y in _epoch(single, 0)])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4
    # Another epoch: another order and other crops.
    assert not torch.equal(torch.cat([x for x, _ in _epoch(single, 0)]), torch.cat([x for x, _ in _epoch(single, 1)]))


def test_val_split_is_capped_stratified_and_shared_by_the_ranks(folder):
    cfg = make_config(method="natural", dataset="imagenet", data_dir=str(folder), val_size=4, image_size=16,
                      num_workers=0, batch_size=2)
    info, train, val = datasets.run_data(cfg, torch.device("cpu"), distributed.Distributed())
    assert info.num_classes == 2 and info.input_size == (16, 16) and train.num_samples == 8
    assert len(val) == 4 and sorted(torch.as_tensor(val.dataset.targets)[val.indices].tolist()) == [0, 0, 1, 1]
    assert val.chunk_size == 2  # the trainer validates in chunks of the per-process batch size
    # Rank r of 2 gets chunks r, r + 2, ...: together the chunks of one process, with the same starts.
    one = [(s, x, y) for s, x, y in val.chunks(1)]
    two = sorted((c for r in range(2) for c in val.chunks(1, r, 2)), key=lambda c: c[0])
    assert [c[0] for c in one] == [c[0] for c in two] == [0, 1, 2, 3]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(one, two))
    # Streamed and in-memory validation agree on the same images.
    model = build_model("resnet18", num_classes=2, width=4, mean=datasets.IMAGENET_MEAN, std=datasets.IMAGENET_STD)
    x, y = torch.cat([c[1] for c in one]), torch.cat([c[2] for c in one])
    options = {"eps": 4 / 255, "alpha": 1 / 255, "steps": 2, "precision": "fp32", "seed": 3,
               "autocast": contextlib.nullcontext, "device": torch.device("cpu")}
    in_memory = robust_accuracy(model, datasets.TensorValSet(x, y, chunk_size=3), **options)
    streamed = robust_accuracy(model, datasets.ValSet(torch.utils.data.TensorDataset(x, y), chunk_size=3), **options)
    assert streamed == in_memory


@pytest.mark.parametrize("extra,message", [
    (["--data-dir", "{tmp}/nowhere"], "ImageNet train split not found: expected a directory {tmp}/nowhere/train"),
    ([], "imagenet needs --data-dir DIR"),
    (["--data-dir", "{tmp}/no_val"], "ImageNet val split not found"),
    (["--data-dir", "{tmp}/other_classes"], "must hold the same class folders"),
    (["--data-dir", "{tmp}/empty_class"], "no_images"),
    (["--data-dir", "{tmp}/no_val", "--synthetic-batches", "2"],
     "--synthetic-batches applies to --dataset synthetic-imagenet"),
])
def test_bad_imagenet_dir_is_a_clear_error_before_any_file(tmp_path, capsys, extra, message):
    _make_image_folder(tmp_path / "no_val", n_per_class=1)
    shutil.rmtree(tmp_path / "no_val" / "val")
    _make_image_folder(tmp_path / "other_classes", n_per_class=1)
    (tmp_path / "other_classes" / "val" / "cat").rename(tmp_path / "other_classes" / "val" / "cow")
    _make_image_folder(tmp_path / "empty_class", n_per_class=1)
    (tmp_path / "empty_class" / "train" / "no_images").mkdir()
    out = tmp_path / "run"
    extra = [word.format(tmp=tmp_path) for word in extra]
    assert _train(["--method", "natural", "--dataset", "imagenet", *extra, *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rkd-fast train: error: ") and message.format(tmp=tmp_path) in err, err
    assert not out.exists()


def test_dali_loader_without_dali_is_a_clear_error_before_any_file(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # make `import nvidia.dali` fail
    out = tmp_path / "run"
    assert _train(["--method", "natural", "--dataset", "imagenet", "--data-dir", str(folder), "--loader", "dali",
                   *TINY, "--out", str(out)]) == 2
    assert "needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda120" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    ({"dataset": "cifar10", "image_size": 16}, "--image-size applies to --dataset imagenet/synthetic-imagenet"),
    ({"dataset": "synthetic-imagenet", "num_workers": 2}, "--num-workers applies to --dataset imagenet"),
    ({"dataset": "synthetic-imagenet", "synthetic_batches": 0}, "synthetic_batches must be >= 1"),
    ({"dataset": "synthetic-imagenet", "loader": "dali"}, "--loader applies to --dataset imagenet"),
    ({"dataset": "imagenet", "loader": "nvjpeg"}, "unknown loader 'nvjpeg'"),
])
def test_streaming_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method="natural", **options)


def test_synthetic_loader_is_the_seeds_global_batch():
    def loader(batch, seed=3, **kwargs):
        return datasets.SyntheticLoader(batch, num_batches=2, input_size=(8, 8), seed=seed, **kwargs)

    single = loader(4, channels_last=False)
    shards = [loader(2, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(single.x[1::2], shards[1].x) and torch.equal(single.y[0::2], shards[0].y)
    assert torch.equal(single.x, loader(4).x) and not torch.equal(single.x, loader(4, seed=4).x)
    assert len(_epoch(single, 0, start_batch=1)) == 1 and single.num_samples == 8


@pytest.mark.slow
def test_synthetic_imagenet_robust_kd_throughput_run(tmp_path):
    # docs/training.md's throughput command, scaled down: ResNet-50 student and (randomly initialised) teacher. At
    # 64×64 layer4 is 2×2: train-mode BatchNorm over fewer values (32×32, batch 2) sent the Jacobian term to inf.
    torch.manual_seed(1)
    teacher = build_model("resnet50", num_classes=1000, stem="imagenet", width=2)
    teacher_file = save_model(teacher, tmp_path / "teacher.pt")
    args = ["--method", "robust-kd", "--dataset", "synthetic-imagenet", "--arch", "resnet50", "--width", "2",
            "--teacher", str(teacher_file), "--teacher-arch", "resnet50", "--image-size", "64",
            "--synthetic-batches", "2", "--batch-size", "4", "--val-size", "4", "--epochs", "1", "--attack-steps",
            "1", "--no-progress", "--device", "cpu", "--deterministic", "--jac-weight", "1e-4"]  # every term
    # (the Jacobian term of a random ResNet-50 is ~1e5 at step 1: a weight of 1 overflows fp32 by step 2)
    assert _train([*args, "--out", str(tmp_path / "a")]) == 0
    state = checkpoints.load_latest(tmp_path / "a")[0]
    assert state["position"]["global_step"] == 2 and state["model"]["kwargs"]["stem"] == "imagenet"
    row = state["history"][0]
    assert row["images_per_s"] > 0 and all(torch.isfinite(torch.tensor(row[f"train_{k}"]))
                                           for k in ("ce", "kd", "feat", "jac", "total"))
    # The data is a function of the seed: a second run computes the same weights.
    assert _train([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = _weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_train_imagenet_like_one(folder, tmp_path):
    from test_distributed import _assert_same_training, _final, _launch

    # A BatchNorm-free CNN on 8×8 crops (small_cnn's input size): the same crops whatever the world size, so
    # two processes of batch 2 compute what one of batch 4 does; the val split is shared by the ranks.
    def run(out, nproc):
        args = ["train", "--method", "natural", "--dataset", "imagenet", "--data-dir", str(folder), "--arch",
                "small_cnn_nobn", "--width", "4", "--image-size", "8", "--batch-size", str(4 // nproc), "--epochs",
                "1", "--attack-steps", "1", "--num-workers", "0", "--device", "cpu", "--no-progress", "--seed", "2",
                "--out", str(out)]
        result = _launch(nproc, args)
        assert result.returncode == 0, result.stdout + result.stderr
        return _final(out)

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert two["world_size"] == 2 and two["position"]["global_step"] == one["position"]["global_step"] == 2
    _assert_same_training(one, two, atol=1e-5)
    assert two["history"][0]["val_clean_acc"] == one["history"][0]["val_clean_acc"]
