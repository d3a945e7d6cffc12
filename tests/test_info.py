"""`rkd-fast info`: what a bug report needs, as text and as JSON."""

import json

import torch

import rkd_fast
from rkd_fast.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["rkd_fast"] == rkd_fast.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cpu"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cuda_available"] == torch.cuda.is_available() and len(info["gpus"]) == torch.cuda.device_count()
    assert info["backends"] == rkd_fast.backends()
    assert info["extension"]["loaded"] == rkd_fast._extension.extension_loaded()
    assert "triton" in info["packages"] and "pyautoattack" in info["packages"]


def test_info_text(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and f"ATen capability {torch.backends.cpu.get_cpu_capability()}" in text
    assert "extension: " in text and "GPUs: " in text
    for op, entry in rkd_fast.backends().items():
        assert f"  {op}\n" in text and entry["auto (cpu)"] in text
