"""`rkd-fast eval` on every data set the trainer reads (generated CIFAR-10/100 pickles and an ImageFolder tree, in
their real on-disk formats) for each model source (a model file, an architecture with a plain state_dict, a
torchvision architecture, a RobustBench spec with a stand-in robustbench module), L2 and the AutoAttack
versions, eval.json's fields, and every bad input refused in one line with exit status 2 before any attack."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import rkd_fast
from rkd_fast import datasets
from rkd_fast.attacks import cli as eval_cli
from rkd_fast.attacks.eval_inputs import with_normalization
from rkd_fast.model_file import save_model
from rkd_fast.cli import main
from rkd_fast.datasets import load_digits, stratified_split
from rkd_fast.models import build_model
from test_datasets import _make_cifar10, _make_cifar100, _make_image_folder
from test_teachers import fake_robustbench  # noqa: F401  (a fixture: the stand-in robustbench module)

pytest.importorskip("pyautoattack")
REPO = Path(__file__).resolve().parents[1]
CIFAR_EPS = 8 / 255


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generated CIFAR files are not the published ones (md5 notices)
        yield


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    _make_cifar10(root, per_batch=4, test=30)
    return root


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    _make_cifar100(root, n_train=10, n_test=16)
    return root


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _make_image_folder(root, n_per_class=3)  # train/ and val/: cat, dog × 3 JPEGs
    return root


def _cifar(root, name, n=None):
    """The test split as the trainer's loaders serve it ([0, 1] floats), or its stratified subset of n."""
    x, y = datasets.load_cifar(root, name, "test")
    if n is not None:
        index = stratified_split(y, n)[1]
        x, y = x[index], y[index]
    return x.float() / 255, y


def _eval(args, out=None):
    rc = main(["eval", *map(str, args), "--no-progress", *(["--out", str(out)] if out else [])])
    assert rc == 0
    return json.loads((out / "eval.json").read_text()) if out else None


# --- model sources × data sets -------------------------------------------------------------------------------

def test_cifar10_model_file(cifar10_dir, tmp_path, capsys):
    model = build_model("resnet18", width=4)  # CIFAR stem, CIFAR-10 normalisation inside
    path = save_model(model, tmp_path / "resnet18.pt", method="natural")
    report = _eval(["--checkpoint", path, "--dataset", "cifar10", "--data-dir", cifar10_dir, "--n-examples", 20,
                    "--attacks", "clean", "fgsm", "pgd2"], tmp_path / "eval")
    expected = rkd_fast.evaluate(model.eval(), _cifar(cifar10_dir, "cifar10", 20), attacks=["clean", "fgsm", "pgd2"],
                                 eps=CIFAR_EPS)
    assert report["results"] == expected
    # RobustBench's fields
    assert report["dataset"] == "cifar10" and report["threat_model"] == "Linf" and report["n_examples"] == 20
    assert report["eps"] == pytest.approx(CIFAR_EPS) and report["model_name"] == "resnet18"
    assert report["clean_acc"] == expected["clean"] and report["autoattack_acc"] is None
    assert report["model"]["source"] == "file" and report["model"]["meta"]["method"] == "natural"
    assert report["format"] == "rkd_fast.eval" and report["config"]["split"] == "test"
    printed = capsys.readouterr().out
    assert "20 samples of cifar10 test, L∞ eps = 0.0313725 (8/255)" in printed and "seconds" in printed


@pytest.mark.parametrize("wrap", ["plain", "module-prefix", "state_dict-key"])
def test_cifar100_architecture_and_state_dict(cifar100_dir, tmp_path, wrap):
    info = datasets.dataset_info("cifar100")
    model = build_model("resnet18", width=4, num_classes=100, mean=list(info.mean), std=list(info.std)).eval()
    state = model.state_dict()
    if wrap == "module-prefix":  # saved from a DataParallel / DDP model
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "state_dict-key":
        state = {"state_dict": state, "epoch": 3}
    torch.save(state, tmp_path / "weights.pth")
    report = _eval(["--arch", "resnet18", "--width", 4, "--weights", tmp_path / "weights.pth", "--dataset", "cifar100",
                    "--data-dir", cifar100_dir, "--attacks", "clean", "pgd2"], tmp_path / "eval")
    assert report["n_examples"] == 16  # the whole test split
    assert report["results"] == rkd_fast.evaluate(model, _cifar(cifar100_dir, "cifar100"), attacks=["clean", "pgd2"],
                                                  eps=CIFAR_EPS)
    assert report["model"]["source"] == "weights" and report["model"]["num_classes"] == 100
    assert report["model"]["normalization"]["mean"] == pytest.approx(list(info.mean))


def test_imagenet_folder_torchvision_architecture(imagenet_dir, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    report = _eval(["--arch", "torchvision:resnet18", "--weights", tmp_path / "resnet18.pth", "--mean", 0.5,
                    "--std", 0.25, "--dataset", "imagenet", "--data-dir", imagenet_dir, "--image-size", 32,
                    "--num-workers", 0, "--eps", 0.05, "--attacks", "clean", "pgd2"], tmp_path / "eval")
    # The trainer's validation pipeline (resize, center crop) and the normalisation put inside the model
    folder = datasets.image_folder(imagenet_dir, "val", datasets.imagenet_transform("val", 32))
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.tensor(folder.targets)
    expected = rkd_fast.evaluate(with_normalization(net, [0.5] * 3, [0.25] * 3).eval(), (x, y),
                                 attacks=["clean", "pgd2"], eps=0.05)
    assert report["results"] == pytest.approx(expected, abs=1e-9)
    assert report["n_examples"] == 6 and report["config"]["split"] == "val"
    assert report["model"]["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}


def test_robustbench_spec(cifar10_dir, tmp_path, fake_robustbench):
    reference = build_model("resnet18", width=4, num_classes=10).eval()
    spec = "robustbench:cifar10/Linf/Fake2024_RN18"
    args = ["--checkpoint", spec, "--model-dir", tmp_path, "--dataset", "cifar10", "--data-dir", cifar10_dir,
            "--n-examples", 10, "--attacks", "clean", "pgd2"]
    assert main(["eval", *map(str, args)]) == 2  # the checkpoint is not on disk, and nothing downloads
    assert fake_robustbench == []
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "cifar10" / "Linf" / "Fake2024_RN18.pt")
    report = _eval(args, tmp_path / "eval")
    assert fake_robustbench == [("Fake2024_RN18", "cifar10", "Linf", str(tmp_path))]
    assert report["model_name"] == "Fake2024_RN18" and report["model"]["source"] == "robustbench"
    assert report["results"] == rkd_fast.evaluate(reference, _cifar(cifar10_dir, "cifar10", 10),
                                                  attacks=["clean", "pgd2"], eps=CIFAR_EPS)


def test_robustbench_not_installed_is_a_clear_error(cifar10_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    rc = main(["eval", "--checkpoint", "robustbench:cifar10/Linf/Carmon2019Unlabeled", "--dataset", "cifar10",
               "--data-dir", str(cifar10_dir), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "robustbench:cifar10/Linf/Carmon2019Unlabeled needs RobustBench" in err and "pip install git+" in err
    assert not (tmp_path / "eval").exists()


# --- threat models and AutoAttack versions ----------------------------------------------------------------------

@pytest.mark.slow
def test_l2_with_autoattack(cifar10_dir, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", width=4).eval()
    path = save_model(model, tmp_path / "model.pt")
    attacks = ["clean", "pgd2", "cw2", "autoattack:apgd-ce"]
    report = _eval(["--checkpoint", path, "--dataset", "cifar10", "--data-dir", cifar10_dir, "--n-examples", 10,
                    "--norm", "l2", "--eps", 0.5, "--attacks", *attacks], tmp_path / "eval")
    assert report["threat_model"] == "L2" and report["eps"] == 0.5
    assert report["autoattack_acc"] == report["results"]["autoattack:apgd-ce"]
    assert report["results"] == rkd_fast.evaluate(model, _cifar(cifar10_dir, "cifar10", 10), attacks=attacks, eps=0.5,
                                                  norm="l2")


@pytest.mark.parametrize("name, version, attacks", [
    ("autoattack", "standard", None),
    ("autoattack-plus", "plus", None),
    ("autoattack-rand", "rand", None),
    ("autoattack:apgd-dlr+fab+square", "custom", ["apgd-dlr", "fab", "square"]),
])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_versions_reach_pyautoattack(monkeypatch, name, version, attacks, norm):
    seen = []

    class Recorder:  # stands in for pyautoattack.AutoAttack: records how it was made, attacks nothing
        def __init__(self, model, *, norm, eps, version, attacks, seed, device):
            seen.append({"norm": norm, "eps": eps, "version": version, "attacks": attacks})

        def run_standard_evaluation(self, x, y, batch_size):
            return x, y

    monkeypatch.setattr("pyautoattack.AutoAttack", Recorder)
    model = build_model("small_cnn", width=4).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct: all of them are attacked
    results = rkd_fast.evaluate(model, (x, y), attacks=[name], eps=0.3, norm=norm, sanity_checks=False)
    assert seen == [{"norm": {"linf": "Linf", "l2": "L2"}[norm], "eps": 0.3, "version": version, "attacks": attacks}]
    assert results[name] == 1.0  # the recorder returns the inputs unchanged


@pytest.mark.slow
def test_autoattack_rand_runs(tmp_path):
    # The real thing once (APGD-CE and APGD-DLR, 20 EOT draws per step): a tiny digits model, a few samples.
    model = build_model("small_cnn", width=4).eval()
    report = _eval(["--checkpoint", save_model(model, tmp_path / "m.pt"), "--dataset", "digits", "--n-examples", 10,
                    "--attacks", "clean,autoattack-rand"], tmp_path / "eval")
    assert 0 <= report["autoattack_acc"] <= report["clean_acc"] and "autoattack-rand" in report["seconds"]


# --- bad input: one line, exit status 2, before any attack, nothing written ---------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    model = save_model(build_model("small_cnn", width=4), root / "model.pt")
    data = model.read_bytes()
    (root / "truncated.pt").write_bytes(data[:len(data) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    torch.save(build_model("small_cnn", width=4).state_dict(), root / "state.pth")
    save_model(build_model("small_cnn", width=4, num_classes=100), root / "hundred.pt")
    (root / "run").mkdir()
    (root / "file.txt").write_text("not a directory")
    return root


BAD = [
    (["--checkpoint", "{files}/missing.pt"], "--checkpoint {files}/missing.pt: no such file"),
    (["--checkpoint", "{files}/run"], "--checkpoint {files}/run is a directory"),
    (["--checkpoint", "{files}/random.pt"], "{files}/random.pt is not an rkd_fast model file"),
    (["--checkpoint", "{files}/truncated.pt"], "{files}/truncated.pt is not an rkd_fast model file: it cannot be "
                                               "read, truncated or damaged"),
    (["--checkpoint", "{files}/hundred.pt"], "returns outputs of shape (2, 100), but digits test has 10 classes"),
    (["--eps", "nan"], "--eps must be > 0 and finite, got nan"),
    (["--eps", "0"], "--eps must be > 0 and finite, got 0.0"),
    (["--eps", "-1"], "--eps must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--n-examples", "0"], "--n-examples must be >= 1, got 0"),
    (["--n-examples", "1000"], "--n-examples 1000: digits test holds only 360 samples"),
    (["--split", "dev"], "--split 'dev': digits has the splits train, val, test"),
    (["--device", "cuda"], "--device cuda: device 'cuda' asked, but no CUDA device is available"),
    (["--out", "{files}/file.txt"], "--out {files}/file.txt exists and is not a directory"),
    (["--out", "{files}/file.txt/eval"], "--out {files}/file.txt/eval: {files}/file.txt is not a directory"),
    (["--norm", "l2"], "--norm l2 needs --eps"),
    (["--norm", "l2", "--eps", "0.5", "--attacks", "fgsm"], "fgsm is an L∞ attack"),
    (["--attacks", "pgd20,pgd20"], "--attacks lists a name twice"),
    (["--attacks", "autoattack:apgd"], "bad custom AutoAttack 'autoattack:apgd'"),
    (["--mean", "0.5", "--std", "0.2"], "--mean applies to --arch, not --checkpoint"),
    (["--model-dir", "{files}"], "--model-dir applies to --checkpoint robustbench:"),
    (["--checkpoint", "robustbench:cifar10/Name"], "bad RobustBench spec"),
    (["--checkpoint", "{files}/model.pt", "--arch", "small_cnn", "--weights", "{files}/state.pth"],
     "give the model as --checkpoint MODEL or as --arch"),
]
BAD_ARCH = [
    (["--arch", "small_cnn"], "--arch needs --weights FILE"),
    (["--arch", "small_cnn", "--weights", "{files}/missing.pth"], "--weights {files}/missing.pth: no such file"),
    (["--arch", "small_cnn", "--weights", "{files}/random.pt"], "{files}/random.pt is not a state_dict file"),
    (["--arch", "small_cnn", "--weights", "{files}/model.pt"], "is an rkd_fast model file, not a plain state_dict"),
    (["--arch", "small_cnn", "--weights", "{files}/state.pth"], "the weights do not fit small_cnn"),  # width 32
    (["--arch", "small_cnn", "--width", "4", "--weights", "{files}/state.pth", "--mean", "0.5", "--std", "0.2"],
     "holds the normalisation mean=[0.3049"),
    (["--arch", "small_cnn", "--weights", "{files}/state.pth", "--mean", "0.5"], "--mean and --std go together"),
    (["--arch", "small_cnn", "--weights", "{files}/state.pth", "--std", "0", "--mean", "0"], "--std must be"),
    (["--arch", "small_cnn", "--weights", "{files}/state.pth", "--num-classes", "0"], "--num-classes must be >= 1"),
    (["--arch", "nonet", "--weights", "{files}/state.pth"], "unknown architecture 'nonet'"),
    (["--arch", "torchvision:nonet", "--weights", "{files}/state.pth"], "unknown torchvision architecture 'nonet'"),
    (["--arch", "mobilenet_v2", "--width", "4", "--weights", "{files}/state.pth"], "has no width argument"),
]
BAD_DATA = [
    (["--dataset", "cifar10"], "cifar10 needs --data-dir DIR"),
    (["--dataset", "cifar10", "--data-dir", "{files}"], "cifar10 test split not found under {files}"),
    (["--dataset", "imagenet", "--data-dir", "{files}"], "ImageNet val split not found"),
    (["--dataset", "digits", "--image-size", "32"], "--image-size applies to imagenet"),
]


@pytest.mark.parametrize("args, message", BAD + BAD_ARCH + BAD_DATA,
                         ids=[" ".join(a) for a, _ in BAD + BAD_ARCH + BAD_DATA])
def test_bad_input_is_one_line_before_any_attack(files, tmp_path, monkeypatch, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(eval_cli, "run_evaluation", lambda *a, **k: pytest.fail("an attack ran"))
    args = [a.format(files=files) for a in args]
    argv = ["eval", *args]
    if "--dataset" not in args:
        argv += ["--dataset", "digits"]
    if "--checkpoint" not in args and "--arch" not in args:
        argv += ["--checkpoint", str(files / "model.pt")]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "eval")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("rkd-fast eval: error: ") and message.format(files=files) in captured.err
    assert not (tmp_path / "eval").exists()


def test_a_later_batch_of_bad_data_writes_nothing(files, tmp_path, monkeypatch, capsys):
    # Labels outside the model's classes in the second batch: found during the evaluation, still one line, exit 2
    x, y = load_digits("test")
    y = y.clone()
    y[300] = 12
    monkeypatch.setattr(eval_cli, "eval_batches", lambda *a, **k: ([(x[:256], y[:256]), (x[256:], y[256:])], len(y),
                                                                    10))
    assert main(["eval", "--checkpoint", str(files / "model.pt"), "--dataset", "digits", "--attacks", "clean",
                 "--no-progress", "--out", str(tmp_path / "eval")]) == 2
    assert "labels must lie in [0, 10)" in capsys.readouterr().err and not (tmp_path / "eval").exists()


def test_truncated_model_file_as_a_process(files, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "rkd_fast", "eval", "--checkpoint", str(files / "truncated.pt"),
                             "--dataset", "digits", "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rkd-fast eval")]
    assert errors == [f"rkd-fast eval: error: {files / 'truncated.pt'} is not an rkd_fast model file: it cannot be "
                      f"read, truncated or damaged? (OSError: [Errno 22] Invalid argument)"]
    assert not (tmp_path / "eval").exists()
