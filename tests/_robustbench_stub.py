"""A stand-in for the `robustbench` package (not installable offline): its `robustbench.utils.load_model` reads
``model_dir/DATASET/THREAT/NAME.pt`` into a model of the test's making, as the real one does."""

import sys
import types

import torch


def install_robustbench(monkeypatch, make_model, calls=None):
    """Puts the stand-in into sys.modules for one test; `calls` (a list) records each load_model call."""
    def load_model(model_name, dataset, threat_model, model_dir):
        if calls is not None:
            calls.append((model_name, dataset, threat_model, model_dir))
        model = make_model()
        model.load_state_dict(torch.load(f"{model_dir}/{dataset}/{threat_model}/{model_name}.pt", weights_only=True))
        return model.eval()

    package, utils = types.ModuleType("robustbench"), types.ModuleType("robustbench.utils")
    utils.load_model, package.utils = load_model, utils
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
