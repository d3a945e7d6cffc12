"""What `rkd-fast demo` and `rkd-fast frontier` share: their settings per data set (one table), the argument
checks, the models' training configs, the test split and its fixed subsets, the evaluation of a model, and the
per-stage clock."""

import time
from pathlib import Path

import torch

# One row per data set the demo and the study run on: the threat model, the teacher's recipe (a PGD-AT model of
# the teacher width), the students' width and epochs (every student the same), the data (batch size, and a fixed
# stratified train subset when train_size is set), and the evaluation (clean, FGSM and PGD-20 on test_samples of
# the test split, None: all; AutoAttack on a fixed subset of it: the demo's and the study's own sizes); --quick
# trains on quick_train_size images (None: all).
SETTINGS = {
    # docs/demo_tuning.md measured these.
    "digits": {"eps": 0.1, "arch": "small_cnn", "batch_size": 128, "train_size": None, "teacher_width": 16,
               "teacher_epochs": 10, "student_width": 8, "student_epochs": 10, "test_samples": None,
               "demo_autoattack_samples": 200, "study_autoattack_samples": None, "seeds": 5,
               "quick_train_size": None},
    # First settings, from a prototype's measurements (2-core CPU: a width-8 student's epoch over 30,000 images
    # took 20-40 s, a width-16 PGD-5 teacher's 8 epochs about 9 minutes; AutoAttack on 500 images of the teacher
    # about 10 minutes): time one model of each method before a full study and set the epochs from the times.
    "fashion-mnist": {"eps": 0.1, "arch": "small_cnn", "batch_size": 128, "train_size": None, "teacher_width": 16,
                      "teacher_epochs": 8, "student_width": 8, "student_epochs": 6, "test_samples": None,
                      "demo_autoattack_samples": 500, "study_autoattack_samples": 500, "seeds": 5,
                      "quick_train_size": 1000},
}
# Smoke runs (--quick, for tests; the numbers mean little), over any data set's row. Their AutoAttack is its first
# two attacks only: FAB-T's and Square's thousands of small steps took most of a smoke run's time.
QUICK = {
    "demo": {"teacher_width": 8, "student_width": 8, "teacher_epochs": 2, "student_epochs": 2, "test_samples": 40,
             "autoattack_samples": 10, "autoattack": "apgd-ce+apgd-t"},
    "frontier": {"seeds": 2, "teacher_width": 4, "student_width": 4, "teacher_epochs": 1, "student_epochs": 1,
                 "test_samples": 30, "autoattack_samples": 10, "autoattack": "apgd-ce+apgd-t"},
}


def settings(dataset, command, quick=False):
    """The settings `command` ("demo" or "frontier") runs with on `dataset`: the data set's row, with the
    command's AutoAttack subset as ``autoattack_samples``, and the smoke run's values when `quick`."""
    if dataset not in SETTINGS:
        raise ValueError(f"--dataset {dataset!r}: the {command} runs on {', '.join(SETTINGS)}")
    row = dict(SETTINGS[dataset])
    samples = {"demo": row.pop("demo_autoattack_samples"), "frontier": row.pop("study_autoattack_samples")}
    row["autoattack_samples"] = samples[command]
    row["autoattack"] = "standard"
    if command == "demo":
        row.pop("seeds")
    quick_train_size = row.pop("quick_train_size")
    if quick:
        row.update(QUICK[command], train_size=quick_train_size)
    return row


def common_options(dataset, settings_row, *, eps, seed, device="cpu", data_dir=None):
    """The trainer options every model of a run shares."""
    common = {"dataset": dataset, "arch": settings_row["arch"], "batch_size": settings_row["batch_size"],
              "device": device, "progress": False, "eps": float(eps), "seed": seed}
    if settings_row.get("train_size") is not None:
        common["train_size"] = settings_row["train_size"]
    if data_dir is not None:
        common["data_dir"] = str(data_dir)
    return common


def training_config(name, settings_row, common, teacher_path, *, free_at_replays=5):
    """The trainer config of model `name`: the teacher is PGD-AT at the teacher's width; a student is trained with
    the method of its name at the student width, given the teacher file when its method distils one. free-at
    replays each batch `free_at_replays` times over the epochs divided by that: the same optimizer steps."""
    from .train.methods import METHODS

    if name == "teacher":
        cfg = {**common, "method": "pgd-at", "width": settings_row["teacher_width"],
               "epochs": settings_row["teacher_epochs"]}
    else:
        cfg = {**common, "method": name, "width": settings_row["student_width"],
               "epochs": settings_row["student_epochs"]}
        if METHODS[name].needs_teacher:
            cfg["teacher"] = str(teacher_path)
        if "free_replays" in METHODS[name].options():
            cfg.update(free_replays=free_at_replays, epochs=max(1, cfg["epochs"] // free_at_replays))
    cfg["eval_every"] = cfg["epochs"]  # the trainer's robust validation once, at the end
    return cfg


# --- argument checks -------------------------------------------------------------------------------------------

def check_eps(eps, flag="eps"):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"{flag} must be a number in (0, 1), got {eps!r}")
    return float(eps)


def check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_samples(name, value):
    """A subset size: None (the setting's) or an int >= 0 (0: all)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_teacher(path, dataset):
    """A teacher model file that takes `dataset`'s inputs and has its classes, or a one-line ValueError."""
    from .datasets import dataset_info
    from .teachers import load_teacher

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--teacher {path} is not a file")
    info = dataset_info(dataset)
    try:
        teacher = load_teacher(path, num_classes=info.num_classes, in_channels=info.in_channels, device="cpu")
    except (ValueError, TypeError) as error:
        raise ValueError(f"--teacher {path}: {error}") from error
    try:
        with torch.no_grad():
            teacher(torch.zeros(1, info.in_channels, *info.input_size))
    except RuntimeError as error:
        raise ValueError(f"--teacher {path} does not take {dataset}'s {info.input_size} inputs: "
                         f"{' '.join(str(error).split())}") from error
    return path


# --- data and evaluation ---------------------------------------------------------------------------------------

def test_split(dataset, test_samples, autoattack_samples, data_dir=None):
    """``(x, y, aa_index)``: the test split (a fixed class-stratified subset of `test_samples` when set), x float
    in [0, 1], and the indices of AutoAttack's fixed class-stratified subset of it (`autoattack_samples`; 0 or
    None: all)."""
    from .datasets import open_split, stratified_subset

    x, y = open_split(dataset, "test", data_dir)
    if test_samples:
        keep = stratified_subset(y, test_samples)
        x, y = x[keep], y[keep]
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return x, y, stratified_subset(y, autoattack_samples or 0)


def evaluate_model(model, test, aa, eps, seed, attacks=("clean", "fgsm", "pgd20"), autoattack="standard"):
    """`attacks` on `test` and AutoAttack on `aa` (both ``(x, y)``): {name: accuracy, "autoattack": ...}.
    `autoattack`: "standard", or a custom list of AutoAttack's attacks such as "apgd-ce+apgd-t"."""
    from .attacks import evaluate

    aa_attack = "autoattack" if autoattack == "standard" else f"autoattack:{autoattack}"
    scores = evaluate(model, test, attacks=list(attacks), eps=eps, seed=seed)
    scores_aa = evaluate(model, aa, attacks=[aa_attack], eps=eps, seed=seed, sanity_checks=False)
    return {**{name: scores[name] for name in attacks}, "autoattack": scores_aa[aa_attack]}


class Stages:
    """Wall and process-CPU seconds of each stage (the machine may be shared: CPU time is the steadier one)."""

    def __init__(self, show, prefix="demo"):
        self.show, self.prefix = show, prefix
        self.records = {}

    def run(self, name, function):
        if self.show:
            print(f"[{self.prefix}] {name} ...", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        value = function()
        record = {"wall_seconds": round(time.perf_counter() - wall, 3),
                  "cpu_seconds": round(time.process_time() - cpu, 3)}
        self.records[name] = record
        if self.show:
            print(f"[{self.prefix}] {name}: {record['wall_seconds']:.1f} s wall, {record['cpu_seconds']:.1f} s CPU",
                  flush=True)
        return value


def plain(value):
    """`value` as plain containers for a model file's meta (save_model): tuples become lists, anything else odd a
    string."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or type(value) in (str, bool, int, float):
        return value
    return str(value)
