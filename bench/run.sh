#!/usr/bin/env bash
# Benchmarks, by hand; each reports and asserts nothing:
#   bash bench/run.sh --compare [bench/compare.py options]   llm-server vs mlx-lm's limits and mlx_lm.server
#   bash bench/run.sh --profile [bench/profile.py options]   py-spy of the worker and HTTP process under load
#   bash bench/run.sh [bench/throughput.py options]          batched vs one at a time
#   bash bench/run.sh --prompt-cache [bench/prompt_cache.py options]
#   bash bench/run.sh --structured [bench/structured.py options]   answers under a grammar vs free ones
#   bash bench/run.sh --distributed [bench/distributed.py options]   2 ranks over loopback vs one process
#
# On Linux, MLX's CPU wheel ships a slow built-in BLAS with which batching gains nothing; Debian's
# OpenBLAS, preloaded, is ~20x faster on float32 matmuls. This script fetches it (apt-get
# download, unpacked into .test-deps/openblas, nothing installed system-wide) and preloads it for
# every process of the run, both sides alike. BLAS=builtin skips that.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
mkdir -p .test-deps
# MLX's backend on Linux is an extra: cpu by default, LLM_SERVER_BACKEND=cuda on an NVIDIA machine.
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${LLM_SERVER_BACKEND:-cpu},bench]" >.test-deps/pip.log 2>&1; then
    cat .test-deps/pip.log >&2
    exit 1
fi

BLAS=${BLAS:-openblas}
if [ "${LLM_SERVER_BACKEND:-cpu}" != cpu ]; then
    BLAS=builtin  # the GPU does the matmuls
fi
if [ "$BLAS" = openblas ] && [ "$(uname -s)" = Linux ]; then
    LIB=.test-deps/openblas/usr/lib/$(uname -m)-linux-gnu
    if [ ! -e "$LIB/openblas-pthread/libblas.so.3" ]; then
        mkdir -p .test-deps/openblas/debs
        (cd .test-deps/openblas/debs && apt-get download libopenblas0-pthread libgfortran5 >/dev/null 2>&1)
        for deb in .test-deps/openblas/debs/*.deb; do dpkg -x "$deb" .test-deps/openblas; done
    fi
    LIB=$(cd "$LIB" && pwd)
    export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_PRELOAD="$LIB/openblas-pthread/libblas.so.3"
else
    BLAS=builtin
fi
export LLM_SERVER_BENCH_BLAS=$BLAS
export HF_HUB_OFFLINE=1
if [ "${1:-}" = --compare ]; then
    shift
    exec .venv/bin/python bench/compare.py "$@"
fi
if [ "${1:-}" = --profile ]; then
    shift
    exec .venv/bin/python bench/profile.py "$@"
fi
if [ "${1:-}" = --distributed ]; then
    shift
    exec .venv/bin/python bench/distributed.py "$@"
fi
if [ "${1:-}" = --structured ]; then
    shift
    exec .venv/bin/python bench/structured.py "$@"
fi
if [ "${1:-}" = --prompt-cache ]; then
    shift
    exec .venv/bin/python bench/prompt_cache.py "$@"
fi
exec .venv/bin/python bench/throughput.py "$@"
