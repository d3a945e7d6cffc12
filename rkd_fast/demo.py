"""`rkd-fast demo`: the whole recipe on a small data set (default: the embedded digits, on CPU, in a few minutes;
--dataset fashion-mnist reads Fashion-MNIST's files).

Trains a robust teacher (PGD-AT), then four students of one smaller architecture: natural, kd, robust-kd, and a
PGD-AT student (the cost baseline robust-kd competes with); --all adds the methods declared baselines
(rkd_fast.train.methods: same student architecture, width, epochs and schedule; the distilling ones distil the same
teacher). Evaluates every model on the test split (clean, FGSM, PGD-20 and AutoAttack standard, L∞ radius --eps),
prints a table, and writes into --out:

    results.json              accuracies, training seconds, per-stage wall and CPU seconds, config, versions
    robustness_vs_cost.png    robust accuracy (PGD-20 and AutoAttack) against each model's training seconds
    models/NAME.pt            every model (rkd_fast.save_model), so `rkd-fast eval` can re-check it

``train_seconds`` of a model is its own training time (the trainer's clock: optimizer steps only); the
students' figures do not include the teacher's. The settings per data set: rkd_fast.studies.SETTINGS.
"""

import sys
from pathlib import Path

import torch

from .dirlock import holding_lock
from .runfiles import RunFiles
from .studies import SETTINGS, Stages, check_eps, check_int, check_samples, plain, training_config

# The models trained, in order (the teacher first: the distilling students load it). A student's name is its method.
MODEL_NAMES = ("teacher", "natural", "kd", "robust-kd", "pgd-at")


def add_arguments(parser):
    from .train.methods import baseline_methods

    parser.add_argument("--dataset", default="digits", choices=tuple(SETTINGS),
                        help="data set (default: %(default)s); its settings: rkd_fast.studies.SETTINGS")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="where the data set's files are, when it reads files (as `rkd-fast train`)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=None,
                        help="L∞ radius on the [0, 1] pixel scale, for PGD-AT training and every attack "
                             "(default: the data set's, 0.1 for digits)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, a test subset (for tests; the numbers mean little)")
    parser.add_argument("--autoattack-samples", type=int, default=None, metavar="N",
                        help="AutoAttack on a fixed class-stratified subset of N test samples "
                             f"(default: the data set's, {SETTINGS['digits']['demo_autoattack_samples']} for digits; "
                             "0 or more than the split: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these models are too small for two threads "
                             "to help, and on a busy machine they slow down; see docs/demo_tuning.md)")
    parser.add_argument("--all", action="store_true",
                        help="also train and evaluate the baseline students " + ", ".join(baseline_methods()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the demo results already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no per-stage progress lines")


def model_names(all_baselines=False):
    """The models a run trains, in order; --all appends the methods declared baselines (registry order)."""
    from .train.methods import baseline_methods

    return MODEL_NAMES + (tuple(m for m in baseline_methods() if m not in MODEL_NAMES) if all_baselines else ())


def check_out(out, overwrite):
    """Refuses an --out holding another demo's results unless --overwrite, and then removes exactly the files that
    demo wrote (its record, rkd_fast.runfiles). Other files in --out, models/ included, are never touched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    files = RunFiles(out)
    files.names()  # a record that names anything outside the demo's own files is refused before anything runs
    if not files.exists():
        return
    if not overwrite:
        raise ValueError(f"--out {out} holds another demo's results; pass --overwrite to replace them or choose "
                         "another --out")
    files.remove_all()


def format_table(results):
    header = f"{'model':<10} {'clean':>7} {'FGSM':>7} {'PGD-20':>7} {'AA':>7} {'train s':>8} {'vs pgd-at':>9}"
    lines = [header, "-" * len(header)]
    base = results["models"]["pgd-at"]["train_seconds"]
    for name, r in results["models"].items():
        lines.append(f"{name:<10} {r['clean']:7.1%} {r['fgsm']:7.1%} {r['pgd20']:7.1%} {r['autoattack']:7.1%} "
                     f"{r['train_seconds']:8.2f} {r['train_seconds'] / base:8.2f}×")
    lines.append(f"L∞ eps = {results['eps']}; clean/FGSM/PGD-20 on {results['test_samples']} test samples, "
                 f"AutoAttack ({results['autoattack_version']}) on {results['autoattack_samples']}")
    return "\n".join(lines)


def plot(results, path):
    from .plots import plot_robustness_vs_cost

    return plot_robustness_vs_cost(results["models"], path, eps=results["eps"],
                                   xlabel="training seconds (own training only, log scale)")


@holding_lock  # one process per --out
def run_demo(out, *, dataset="digits", data_dir=None, eps=None, quick=False, all_baselines=False,
             autoattack_samples=None, threads=1, seed=0, overwrite=False, progress=True, command=None):
    """The demo as a function; returns the results dict (also written to out/results.json)."""
    from .atomic import atomic_write_json
    from .model_file import save_model
    from .studies import common_options, evaluate_model, settings as study_settings, test_split
    from .train import train_model
    from .provenance import provenance

    out = Path(out)
    settings = study_settings(dataset, "demo", quick)
    eps = check_eps(settings["eps"] if eps is None else eps)
    check_int("threads", threads)
    if check_samples("autoattack_samples", autoattack_samples) is not None:
        settings["autoattack_samples"] = autoattack_samples
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    # The data are read (and checked) before anything is written or removed.
    x, y, aa_index = test_split(dataset, settings["test_samples"], settings["autoattack_samples"], data_dir)
    check_out(out, overwrite)
    (out / "models").mkdir(parents=True, exist_ok=True)
    files = RunFiles(out)

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test, aa = (x, y), (x[aa_index], y[aa_index])
        stages = Stages(progress)
        common = common_options(dataset, settings, eps=eps, seed=seed, data_dir=data_dir)
        names = model_names(all_baselines)
        configs, models, train_seconds = {}, {}, {}
        for name in names:
            cfg = training_config(name, settings, common, out / "models" / "teacher.pt")
            result = stages.run(f"train {name}", lambda cfg=cfg: train_model(cfg))
            models[name], train_seconds[name] = result.model, result.train_seconds
            configs[name] = result.config.to_dict()
            files.written(save_model(result.model, files.add(out / "models" / f"{name}.pt"), name=name,
                                     method=cfg["method"], eps=float(eps), train_seconds=result.train_seconds,
                                     config=plain(configs[name])))

        scores = {}
        for name in names:
            scores[name] = stages.run(f"evaluate {name}",
                                      lambda name=name: evaluate_model(models[name], test, aa, eps, seed,
                                                                     autoattack=settings["autoattack"]))
    finally:
        torch.set_num_threads(saved_threads)

    results = {
        "dataset": dataset,
        "eps": float(eps),
        "norm": "linf",
        "models": {name: {**scores[name], "train_seconds": train_seconds[name]} for name in names},
        "test_samples": len(test[1]),
        "autoattack_samples": len(aa[1]),
        "autoattack_subset": "all test samples" if len(aa[1]) == len(test[1]) else
        "class-stratified: the first samples of each class in turn (rkd_fast.datasets.stratified_subset)",
        "autoattack_version": settings["autoattack"],
        "quick": bool(quick),
        "settings": settings,
        "threads": threads,
        "stages": stages.records,
        "total_wall_seconds": round(sum(r["wall_seconds"] for r in stages.records.values()), 3),
        "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in stages.records.values()), 3),
        "configs": configs,
        "command": list(command) if command else ["rkd-fast", "demo", "--dataset", dataset, "--out", str(out),
                                                  "--eps", str(eps)]
        + (["--quick"] if quick else []) + (["--all"] if all_baselines else []),
        **provenance(),
    }
    figure = files.add(out / "robustness_vs_cost.png")
    plot(results, figure)
    files.written(atomic_write_json(files.add(out / "results.json"), results), figure)
    return results


def run(args):
    from .cli import invoked_command

    command = invoked_command("demo")
    try:
        results = run_demo(args.out, dataset=args.dataset, data_dir=args.data_dir, eps=args.eps, quick=args.quick,
                           all_baselines=args.all,
                           autoattack_samples=args.autoattack_samples, threads=args.threads, seed=args.seed,
                           overwrite=args.overwrite, progress=not args.no_progress, command=command)
    except (TypeError, ValueError, FileNotFoundError) as error:
        print(f"rkd-fast demo: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"total: {results['total_wall_seconds']:.1f} s wall, {results['total_cpu_seconds']:.1f} s CPU; "
          f"wrote {args.out / 'results.json'}, {args.out / 'robustness_vs_cost.png'}, {args.out / 'models'}/")
    return 0
