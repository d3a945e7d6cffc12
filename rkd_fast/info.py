"""`rkd-fast info`: what is installed and what runs here (versions, the extension's build, the CPU capability
ATen uses, the GPUs, which kernel serves each op): the text to paste into a bug report. ``--json`` prints the
same as JSON."""

import json
import os
import platform
import sys

from .provenance import cpu_model, package_versions


OPTIONAL_PACKAGES = ("triton", "numpy", "scikit-learn", "matplotlib", "tqdm", "torchvision", "pyautoattack",
                     "torchattacks", "tensorboard", "robustbench", "timm", "safetensors", "nvidia-dali-cuda120",
                     "nvidia-dali-cuda130")


def _extension():
    from . import _extension as ext

    try:
        from . import _build_info as build
        built = {"torch_version": build.TORCH_VERSION, "with_cuda": bool(build.WITH_CUDA),
                 "cuda_version": getattr(build, "CUDA_VERSION", None)}
    except ImportError:
        built = None
    return {"loaded": ext.extension_loaded(), "reason_not_loaded": ext.extension_reason(), "build": built,
            "gpu_verified": {op: list(backends) for op, backends in ext.GPU_VERIFIED.items()}}


def _gpus(torch):
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2 ** 30, 1)})
    return gpus


def collect():
    """Everything `rkd-fast info` reports, as a dict of plain values."""
    import torch

    import rkd_fast

    return {
        "rkd_fast": rkd_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": package_versions(OPTIONAL_PACKAGES),
        "extension": _extension(),
        "cpu": {"aten_capability": torch.backends.cpu.get_cpu_capability(),
                "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
                "processor": cpu_model(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads()},
        "cuda_available": torch.cuda.is_available(),
        "gpus": _gpus(torch),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "backends": rkd_fast.backends(),
    }


def format_text(info):
    packages = ", ".join(f"{name} {version}" for name, version in info["packages"].items() if version)
    missing = ", ".join(name for name, version in info["packages"].items() if not version)
    ext = info["extension"]
    build = ext["build"]
    built = ("not built" if build is None else f"built against torch {build['torch_version']}, "
             f"CUDA kernels {'yes (CUDA ' + str(build['cuda_version']) + ')' if build['with_cuda'] else 'no'}")
    cpu = info["cpu"]
    lines = [
        f"rkd_fast {info['rkd_fast']}  python {info['python']}  {info['platform']}",
        f"torch {info['torch']}  CUDA {info['torch_cuda'] or 'none'}  cuDNN {info['cudnn'] or 'none'}",
        f"packages: {packages}",
        f"not installed: {missing or 'none'}",
        f"extension: {built}; {'loaded' if ext['loaded'] else 'not loaded: ' + str(ext['reason_not_loaded'])}",
        f"CPU: {cpu['processor']}, {cpu['cores']} cores, torch threads {cpu['torch_threads']}, ATen capability "
        f"{cpu['aten_capability']}" + (f" (ATEN_CPU_CAPABILITY={cpu['ATEN_CPU_CAPABILITY']})"
                                       if cpu["ATEN_CPU_CAPABILITY"] else ""),
        "GPUs: " + ("; ".join(f"{g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                              for g in info["gpus"]) or "none"),
        "backends:",
    ]
    for op, entry in info["backends"].items():
        lines.append(f"  {op}")
        lines += [f"    {key:<12} {value}" for key, value in entry.items()]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args):
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
