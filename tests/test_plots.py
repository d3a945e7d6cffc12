"""rkd_fast.plots: `rkd-fast plot` on real runs of the trainer, the frontier plot, and the demo's plot, each checked
through what it drew (the curves read back from the figure) and the PNG it wrote."""

import pytest
from PIL import Image

from rkd_fast import demo, plots
from rkd_fast.cli import main
from rkd_fast.train import train_model

RUN = dict(dataset="digits", epochs=3, width=4, batch_size=256, attack_steps=1, progress=False, deterministic=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs: natural (losses ce, total) and kd (ce, kd, total), the kd one validated every epoch."""
    root = tmp_path_factory.mktemp("runs")
    train_model(RUN, method="natural", eval_every=2, out=str(root / "natural"))
    teacher = root / "teacher.pt"
    from rkd_fast.model_file import save_model
    from rkd_fast.models import build_model
    save_model(build_model("small_cnn", width=4), teacher)
    train_model(RUN, method="kd", teacher=str(teacher), out=str(root / "kd"))
    return root


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
def test_plot_runs_draws_every_loss_term_and_the_validation_accuracy(runs, tmp_path):
    drawn = plots.plot_runs([runs / "natural", runs / "kd"], tmp_path / "curves.png")
    natural, kd = plots.read_metrics(runs / "natural"), plots.read_metrics(runs / "kd")
    assert list(drawn) == ["ce", "total", "kd", "validation accuracy"]  # the union of the runs' loss terms
    assert drawn["ce"]["natural"] == ([1.0, 2.0, 3.0], [row["train_ce"] for row in natural])
    assert drawn["kd"] == {"kd": ([1.0, 2.0, 3.0], [row["train_kd"] for row in kd])}  # natural has no kd term
    val = drawn["validation accuracy"]
    # natural was validated at epochs 2 and 3 only (eval_every=2, and after the last): no point at epoch 1
    assert val["natural clean"] == ([2.0, 3.0], [row["val_clean_acc"] for row in natural[1:]])
    assert val["kd robust"] == ([1.0, 2.0, 3.0], [row["val_robust_acc"] for row in kd])
    width, height = _png(tmp_path / "curves.png")
    assert width > 3 * height / 2  # panels side by side: 4 panels, 3 to a row


@pytest.mark.slow
def test_plot_command(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "kd")]) == 0  # one run: RUN_DIR/curves.png
    assert f"wrote {runs / 'kd' / 'curves.png'}" in capsys.readouterr().out
    _png(runs / "kd" / "curves.png")
    assert main(["plot", str(runs / "kd"), str(runs / "natural"), "--out", str(tmp_path / "both.png")]) == 0
    _png(tmp_path / "both.png")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["{runs}/kd", "{runs}/natural"], "several runs need --out FILE.png"),
    (["{runs}"], "holds no metrics.csv"),
    (["{runs}/kd", "--out", "{runs}"], "is a directory"),
])
def test_plot_command_errors(runs, capsys, args, message):
    before = sorted(p.name for p in runs.iterdir())
    assert main(["plot", *[a.format(runs=runs) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rkd-fast plot: error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in runs.iterdir()) == before


def test_plot_frontier(tmp_path):
    rows = [{"method": "robust-kd", "aa_mean": 0.68, "aa_std": 0.02, "seconds_mean": 2.5, "seconds_std": 0.3},
            {"method": "pgd-at", "aa_mean": 0.815, "aa_std": 0.01, "seconds_mean": 5.3, "seconds_std": 0.4},
            {"method": "pgd-at", "aa_mean": 0.83, "aa_std": 0.015, "seconds_mean": 10.6, "seconds_std": 0.5}]
    drawn = plots.plot_frontier(rows, tmp_path / "frontier.png")
    assert drawn == {"robust-kd": ([2.5], [68.0]), "pgd-at": ([5.3, 10.6], [81.5, 83.0])}  # one series per method
    _png(tmp_path / "frontier.png")


@pytest.mark.parametrize("row, message", [
    ({"method": "x", "aa_mean": 0.5, "aa_std": 0.1, "seconds_mean": 1.0}, "lacks seconds_std"),
    ({"method": "x", "aa_mean": float("nan"), "aa_std": 0.1, "seconds_mean": 1.0, "seconds_std": 0}, "finite"),
    ({"method": "x", "aa_mean": 0.5, "aa_std": 0.1, "seconds_mean": 0.0, "seconds_std": 0}, "seconds_mean must be > 0"),
])
def test_plot_frontier_refuses_bad_rows(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_frontier([row], tmp_path / "frontier.png")
    assert not (tmp_path / "frontier.png").exists()


def test_demo_plot_uses_the_helpers(tmp_path):
    results = {"eps": 0.1, "models": {"natural": {"train_seconds": 0.6, "pgd20": 0.46, "autoattack": 0.40},
                                      "robust-kd": {"train_seconds": 2.5, "pgd20": 0.72, "autoattack": 0.68}}}
    drawn = demo.plot(results, tmp_path / "robustness_vs_cost.png")
    assert drawn == {"PGD-20": ([0.6, 2.5], pytest.approx([46.0, 72.0])),
                     "AutoAttack": ([0.6, 2.5], pytest.approx([40.0, 68.0]))}
    _png(tmp_path / "robustness_vs_cost.png")
