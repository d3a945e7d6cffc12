# The README's commands: `make install`, `make test` and `make demo`. Each makes .venv when needed, installs torch and
# the project into it (the extension built with --no-build-isolation), then runs.
# SYSTEM_TORCH=1 uses the python on PATH and the torch (>= 2.11) already installed there: no download.

PYTHON ?= python3
VENV ?= .venv
SYSTEM_TORCH ?= 0
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP_DEPS ?= ninja pybind11 triton tqdm scikit-learn matplotlib pytest pytest-benchmark expecttest pyautoattack torchattacks tensorboard timm safetensors nvidia-dali-cuda120
MAX_JOBS ?= 2
CMAKE_BUILD ?= build-cmake

ifeq ($(SYSTEM_TORCH),1)
PY := $(PYTHON)
STAMP := build/.installed-system
else
PY := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed
endif

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

TEST_STAGES := test-python test-default-cpu test-triton test-cpp
.PHONY: install test $(TEST_STAGES) demo bench clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=64" wheel

ifeq ($(SYSTEM_TORCH),1)
$(STAMP): $(SOURCES)
	@$(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 11) else 'SYSTEM_TORCH=1 needs torch >= 2.11, found ' + torch.__version__)"
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@
else
$(STAMP): $(SOURCES) | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH_SPEC) $(PIP_DEPS)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e .
	touch $@
endif

# The four test stages are independent processes, and the main pytest run keeps about one core busy: two stages at a
# time, each stage's output printed whole when it ends (pytest's numbered temporary directories are safe to share).
test: install
	$(MAKE) --no-print-directory -j2 --keep-going --output-sync=target $(TEST_STAGES)

test-python: install
	$(PY) -m pytest -q --durations=25 tests

# The tests marked cross_path (ops against their reference, losses and baselines against a direct computation,
# shared statistics, one process against two) once more with ATen's portable kernels instead of this CPU's SIMD
# ones: reduction orders differ between machines, and a tolerance tuned on one CPU shows up here, not on the next
# machine. A run compared with itself bit for bit (resume, determinism) needs no second pass.
test-default-cpu: install
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m cross_path tests

# Triton kernels on CPU run under the interpreter, which must be switched on before triton is imported:
# a process of their own.
test-triton: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/triton

# The CMake build of the same kernels against libtorch, with the C++ test run by ctest (CPU only unless a
# CUDA compiler is found), in its own build directory and process.
test-cpp: install
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_MAKE_PROGRAM="$$($(PY) -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')"
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

demo: install
	$(PY) -m rkd_fast demo --out runs/demo --overwrite  # re-runnable: replaces the previous demo results

bench: install
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build $(CMAKE_BUILD) rkd_fast/_C*.so rkd_fast/_build_info.py *.egg-info
