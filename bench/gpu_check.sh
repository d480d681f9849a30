#!/usr/bin/env bash
# One command, under five minutes on one GPU: the benchmark suite with sampler and students on CUDA.
#
#   bench/gpu_check.sh [OUT.json]          (default OUT: bench-results-gpu.json, tables in OUT.md)
#
# What runs: first the CUDA tests of the fast path (tests/test_fastpath.py -k cuda: pinned staging,
# uploads, the sampler's deferred publishing on the GPU; skipped if pytest is not installed), then
# python -m bench.run_all --quick --device cuda — transport (host buffers, as on any
# machine), the sampler's steps/s alone and with 1 and 2 students (sampler and students on the
# GPU: `--device cuda` for each role, i.e. sampler.device=cuda and each student's device=cuda),
# `gped run` against `gped reference --device cuda` for the same work, and memory.
#
# No GPU (torch sees no CUDA device): it says so on stderr, runs the CPU variant of the same
# suite instead (OUT gets "-cpu" before .json) and exits 0, so the script works on any machine;
# set GPED_REQUIRE_GPU=1 to make that case exit 3 without running anything (for GPU CI).
# Environment: PYTHON (default: python3 on PATH, or the active venv's), GPED_BENCH_ARGS (extra
# arguments for bench.run_all, e.g. "--only sampler,end_to_end").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PYTHON="${PYTHON:-python3}"
out="${1:-bench-results-gpu.json}"
extra=(${GPED_BENCH_ARGS:-})

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    gpu="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')"
    echo "gpu_check: CUDA device found ($gpu): sampler and students on cuda" >&2
    start=$(date +%s)
    if "$PYTHON" -c 'import pytest' 2>/dev/null; then
        timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k cuda \
            || { echo "gpu_check: the CUDA fast-path tests failed" >&2; exit 1; }
    else
        echo "gpu_check: pytest not installed; skipping the CUDA fast-path tests" >&2
    fi
    status=0
    timeout 230 "$PYTHON" -m bench.run_all --quick --device cuda --out "$out" --work bench-work-gpu "${extra[@]}" || status=$?
    if [[ $status -eq 124 ]]; then
        echo "gpu_check: stopped at the 230 s limit; the sections that finished are in $out" >&2
        exit 124
    fi
    [[ $status -eq 0 ]] || { echo "gpu_check: bench.run_all failed (exit $status)" >&2; exit "$status"; }
    echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $out and ${out%.json}.md" >&2
else
    if [[ "${GPED_REQUIRE_GPU:-0}" == "1" ]]; then
        echo "gpu_check: NO GPU: torch sees no CUDA device on this machine, and GPED_REQUIRE_GPU=1; nothing run" >&2
        exit 3
    fi
    cpu_out="${out%.json}-cpu.json"
    echo "gpu_check: NO GPU: torch sees no CUDA device on this machine; running the CPU variant instead -> $cpu_out" >&2
    "$PYTHON" -m bench.run_all --quick --device cpu --out "$cpu_out" --work bench-work "${extra[@]}"
    echo "gpu_check: NO GPU: only the CPU variant ran (results in $cpu_out)" >&2
fi
