#!/usr/bin/env bash
# One call on a machine with a GPU: build the extension there, then the named phases, each
# logging to $OUT; a summary line per phase is printed last.
#   bash benchmarks/gpu_session.sh all OUT_DIR      # build, GPU tests, kernel and step benchmarks, frontier:
#                                                   # the whole verification inside 10 minutes on one H200
#   bash benchmarks/gpu_session.sh build gputests suite opsbench bench
# Phases: build (the extension for sm_90 against that machine's torch; reused from .gpubuild/ when a previous
# call's library was fetched there and carried), gputests (the tests marked gpu: the ops' cuda and triton-cuda
# cases, tests/test_train_gpu.py), suite (the rest of the test suite against that machine's torch), opsbench
# (python -m rkd_fast.bench.ops, every shape), bench (rkd-fast bench: training steps, teacher inference,
# kernels; tarred to $OUT/bench.tgz).
# Carry .whl/ (expecttest, which opcheck needs and the image lacks) and .gpubuild/ when present.
# Environment: PYTEST_ARGS (extra pytest arguments of gputests), BENCH_ARGS, BENCH_LIMIT, SUITE_LIMIT.
set -u
export PYTHONUNBUFFERED=1
if [ "${1:-}" = all ]; then
    # The whole verification in one 10-minute call: each phase's limit below keeps the sum under 570 s.
    [ -n "${2:-}" ] && OUT=$2
    set -- build gputests opsbench bench frontier
    QUICK_LIMITS=1
fi
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ]; then  # wheels carried for packages the machine lacks (expecttest for opcheck)
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
summary=()
phase() {  # phase NAME TIMEOUT CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, records its status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc, $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.log" | cut -c1-200)")
    return $rc
}
for p in "$@"; do
    case $p in
    info)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
        $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())";;
    build)
        # A library built by an earlier call (fetched from $OUT into .gpubuild/ and carried) is reused; the
        # sources' sha256 it records makes rkd_fast refuse it if csrc/ changed since, and then it is rebuilt.
        if [ -f .gpubuild/_build_info.py ]; then
            cp .gpubuild/_build_info.py .gpubuild/_C*.so rkd_fast/
            if $PY -c "import rkd_fast, sys; sys.exit(0 if rkd_fast._extension.extension_has_cuda() else 1)" 2>/dev/null; then
                echo "reusing the carried build"; $PY -c "import json, rkd_fast; print(json.dumps(rkd_fast.backends()))"
                continue
            fi
            rm -f rkd_fast/_build_info.py rkd_fast/_C*.so
        fi
        # Built where it runs: this machine's torch and Python; sm_90 only (H100/H200) to halve the compile.
        # The system compiler when there is one: the lent H100 image's default g++ (/opt/gcc, 2026-11-25) linked
        # libstdc++ statically into the library, whose own locale then crashed formatting a number into an
        # error message (a segfault instead of ValueError in the CUDA kernel's bad-argument test).
        compilers=()
        [ -x /usr/bin/g++ ] && compilers=(CC=/usr/bin/gcc CXX=/usr/bin/g++)
        phase build $([ -n "${QUICK_LIMITS:-}" ] && echo 180 || echo 300) env "${compilers[@]}" TORCH_CUDA_ARCH_LIST=9.0 RKD_FAST_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace \
            || tail -n 40 "$OUT/build.log"
        $PY -c "import json, rkd_fast; print(json.dumps(rkd_fast.backends()))" | tee "$OUT/backends.json"
        cp rkd_fast/_build_info.py rkd_fast/_C*.so "$OUT/" 2>/dev/null;;
    gputests)
        phase gputests $([ -n "${QUICK_LIMITS:-}" ] && echo 140 || echo 270) $PY -m pytest -q -p no:cacheprovider -rfE --tb=short ${PYTEST_ARGS:-} \
            -m gpu tests/test_feature_distance.py tests/test_fd_jacobian.py tests/test_train_gpu.py
        grep -E "^(FAILED|ERROR)" "$OUT/gputests.log" | head -n 40;;
    suite)
        # One thread per worker: 12 workers of 16 threads each on 16 cores ran ~10x slower.
        phase suite ${SUITE_LIMIT:-420} env OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider -rfE --tb=short -n 12 tests \
            -m "not gpu" --ignore=tests/triton
        grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -n 40;;
    opsbench)
        phase opsbench $([ -n "${QUICK_LIMITS:-}" ] && echo 60 || echo 240) $PY -m rkd_fast.bench.ops --device cuda --suite all --min-run-time 0.3 --json "$OUT/opsbench.json"
        tail -n 20 "$OUT/opsbench.log";;
    bench)  # training steps of every method, teacher inference and the kernels: report.md + report.json
        phase bench ${BENCH_LIMIT:-$([ -n "${QUICK_LIMITS:-}" ] && echo 90 || echo 330)} $PY -m rkd_fast bench --device cuda --out /tmp/bench --min-time 1 --repeats 3 \
            --kernel-min-time 0.3 ${BENCH_ARGS:-}
        tar czf "$OUT/bench.tgz" -C /tmp bench; cp /tmp/bench/report.md "$OUT/bench_report.md" 2>/dev/null
        tail -n 5 "$OUT/bench.log";;
    frontier)  # the frontier criterion re-measured on the GPU: robust-kd, fgsm-rs, n-fgsm, 5 seeds, digits
        # trained on the GPU (the students' clocks), evaluated on the CPU cores; AutoAttack on a subset to fit
        phase frontier ${FRONTIER_LIMIT:-90} $PY -m rkd_fast frontier --out /tmp/frontier --device cuda --methods \
            robust-kd,fgsm-rs,n-fgsm --jobs 12 --autoattack-samples ${FRONTIER_AA:-100}
        cp /tmp/frontier/results.json "$OUT/frontier_results.json" 2>/dev/null; tail -n 8 "$OUT/frontier.log";;
    *) echo "unknown phase $p"; exit 2;;
    esac
done
printf '%s\n' "${summary[@]}"
