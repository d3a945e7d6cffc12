"""The plots of rkd_fast, in one place: a run's training curves (`plot_runs`, behind `rkd-fast plot`), robust
accuracy against training cost for the demo (`plot_robustness_vs_cost`) and for a frontier study with error bars
(`plot_frontier`). Each writes a PNG atomically (matplotlib's Agg backend: no display needed) and returns what
it drew, so a caller (or a test) can check the curves without reading pixels.

`rkd-fast plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: the loss terms (one panel each) and the validation clean
and robust accuracy of each run's metrics.csv against the epoch, the runs overlaid in one colour each."""

import csv
import math
import sys
from pathlib import Path

from .atomic import atomic_write

SECONDS_LABEL = "training seconds (log scale)"


def _figure(n_panels=1, ncols=3, panel_size=(4.6, 3.4)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig, path):
    """Writes `fig` as a PNG to `path` atomically and closes it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def _drawn(ax):
    """{label: (xs, ys)} of the lines and error-bar markers on `ax`, as drawn."""
    curves = {}
    for line in ax.get_lines():
        label = line.get_label()
        if not label.startswith("_"):
            curves[label] = ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
    for collection in ax.collections:  # scatter points
        label = collection.get_label()
        if not label.startswith("_"):
            points = collection.get_offsets()
            curves[label] = ([float(p[0]) for p in points], [float(p[1]) for p in points])
    for container in ax.containers:  # error bars: the label is the container's, the points its data line's
        label, line = container.get_label(), getattr(container, "lines", (None,))[0]
        if line is not None and not label.startswith("_"):
            curves[label] = ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
    return curves


def _seconds_axes(ax, ylabel, title, xlabel=SECONDS_LABEL):
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 3, 10, 30 rather than 3×10⁰
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# --- accuracy against training cost --------------------------------------------------------------------------

def plot_robustness_vs_cost(models, path, *, eps, title="digits: robust accuracy vs training cost",
                            xlabel=SECONDS_LABEL):
    """The demo's plot: PGD-20 and AutoAttack accuracy of each model against its training seconds, each model
    named beside its PGD-20 point. ``models``: {name: {"train_seconds", "pgd20", "autoattack"}} (accuracies in
    [0, 1]). Returns {series: (seconds, accuracy %)}."""
    fig, (ax,) = _figure(1, panel_size=(6.4, 4.4))
    seconds = [m["train_seconds"] for m in models.values()]
    for key, label, marker in (("pgd20", "PGD-20", "o"), ("autoattack", "AutoAttack", "s")):
        ax.scatter(seconds, [100 * m[key] for m in models.values()], marker=marker, label=label, alpha=0.8)
    for name, m in models.items():
        ax.annotate(name, (m["train_seconds"], 100 * m["pgd20"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    _seconds_axes(ax, f"robust test accuracy, L∞ eps={eps} (%)", title, xlabel)
    drawn = _drawn(ax)
    _save(fig, path)
    return drawn


def plot_frontier(rows, path, *, title="AutoAttack accuracy vs training cost", ylabel="AutoAttack accuracy (%)",
                  xlabel=SECONDS_LABEL):
    """One marker per method at (mean training seconds, mean AutoAttack accuracy) with error bars of one
    standard deviation on both axes. ``rows``: dicts {"method", "aa_mean", "aa_std", "seconds_mean",
    "seconds_std"}, accuracies in [0, 1] (plotted in %); a method may appear in several rows (one point each,
    same marker and colour). Returns {method: (seconds, accuracy %)}."""
    keys = ("method", "aa_mean", "aa_std", "seconds_mean", "seconds_std")
    if not rows:
        raise ValueError("plot_frontier needs at least one row")
    for row in rows:
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"frontier row {row!r} lacks {', '.join(missing)}")
        if not all(isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] >= 0
                   for key in keys[1:]):
            raise ValueError(f"frontier row {row!r}: means and standard deviations must be finite numbers >= 0")
        if row["seconds_mean"] <= 0:
            raise ValueError(f"frontier row {row!r}: seconds_mean must be > 0 (the x axis is logarithmic)")
    methods = list(dict.fromkeys(row["method"] for row in rows))
    markers = "osD^vP*Xhp<>"
    fig, (ax,) = _figure(1, panel_size=(6.4, 4.4))
    for i, method in enumerate(methods):
        mine = [row for row in rows if row["method"] == method]
        ax.errorbar([r["seconds_mean"] for r in mine], [100 * r["aa_mean"] for r in mine],
                    xerr=[r["seconds_std"] for r in mine], yerr=[100 * r["aa_std"] for r in mine],
                    fmt=markers[i % len(markers)], capsize=3, label=str(method), linestyle="none")
    _seconds_axes(ax, ylabel, title, xlabel)
    drawn = _drawn(ax)
    _save(fig, path)
    return drawn


# --- training curves -----------------------------------------------------------------------------------------

def _number(text):
    if text in ("", "None", None):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(run_dir):
    """The rows of RUN_DIR/metrics.csv (one per epoch) with numbers as floats and empty cells as None.
    ValueError naming the file when there is none or it holds no epoch."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no metrics.csv (not a run directory of `rkd-fast train`, or no epoch "
                         "has finished yet)")
    with open(path, newline="") as f:
        rows = [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(f)]
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{path} holds no epochs")
    return rows


def loss_terms(rows):
    """The training loss columns of metrics rows (train_<term>; train_seconds is time, not a loss)."""
    return [key for key in rows[0] if key.startswith("train_") and key != "train_seconds"]


def _labels(run_dirs):
    names = [Path(d).name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_runs(run_dirs, path):
    """The curves of each run's metrics.csv against the epoch: a panel per loss term (the union over the runs),
    and a panel of validation accuracy (clean solid, robust dashed); one colour per run. Returns
    {panel title: {curve label: (epochs, values)}}."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    metrics = [read_metrics(d) for d in run_dirs]
    terms = list(dict.fromkeys(term for rows in metrics for term in loss_terms(rows)))
    fig, axes = _figure(len(terms) + 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [(ax, term[len("train_"):], [(term, "-", "")]) for ax, term in zip(axes, terms)]
    panels.append((axes[-1], "validation accuracy", [("val_clean_acc", "-", " clean"),
                                                     ("val_robust_acc", "--", " robust")]))
    drawn = {}
    for ax, title, columns in panels:
        for i, (label, rows) in enumerate(zip(_labels(run_dirs), metrics)):
            for column, style, suffix in columns:
                points = [(row["epoch"], row[column]) for row in rows if row.get(column) is not None]
                if points:
                    ax.plot(*zip(*points), style, marker=".", color=colours[i % len(colours)], label=label + suffix)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if columns[0][0].startswith("val_") else "training loss (epoch mean)")
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        drawn[title] = _drawn(ax)
    _save(fig, path)
    return drawn


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `rkd-fast train`")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.png",
                        help="the PNG to write (default, one run: RUN_DIR/curves.png)")


def run(args):
    try:
        if args.out is None and len(args.runs) > 1:
            raise ValueError("several runs need --out FILE.png")
        out = args.out or Path(args.runs[0]) / "curves.png"
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; name the PNG file to write")
        plot_runs(args.runs, out)
    except ValueError as error:
        print(f"rkd-fast plot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
