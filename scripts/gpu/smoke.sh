#!/usr/bin/env bash
# The prepared proof run for one GPU machine (issue 21): about 3 minutes, 8 at most.
#
#   on the GPU machine (the device tool, carry: ["wheels"]):
#       bash scripts/gpu/smoke.sh "$OUT/smoke.json"
#   here, CPU dry run of the same plumbing (gloo, the CPU venv):
#       SMOKE_CPU=1 SMOKE_PYTHON=.venv/bin/python bash scripts/gpu/smoke.sh /tmp/smoke.json
#
# It writes one JSON report (argument 1, default ./smoke-report.json) and exits 0 when every
# check passed. Everything it creates lives in one temporary directory, removed at the end
# (SMOKE_KEEP=1 keeps it): the packages the machine lacks (installed from wheels/ with
# `pip --target`, not into a venv: the machine's python3 is itself a venv, so a child venv
# with --system-site-packages would not see its torch), run directories, data cache,
# Python, CUDA and Triton caches. Nothing is fetched: wheels/ comes from
# scripts/gpu/fetch_wheels.sh. What it runs: scripts/gpu/smoke.py.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
REPORT="$(realpath -m "${1:-smoke-report.json}")"
PY="${SMOKE_PYTHON:-python3}"
T="$(mktemp -d -t ncl-smoke.XXXXXX)"
cleanup() { if [ "${SMOKE_KEEP:-0}" != 1 ]; then rm -rf "$T"; else echo "kept $T"; fi; }
trap cleanup EXIT

export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export XDG_CACHE_HOME="$T/cache" CUDA_CACHE_PATH="$T/cache/nv" TRITON_CACHE_DIR="$T/cache/triton"
export TORCHINDUCTOR_CACHE_DIR="$T/cache/inductor" MPLCONFIGDIR="$T/cache/mpl"
export NCL_DATA_CACHE="$T/data" NCL_ALLOCATOR=system
if [ "${SMOKE_CPU:-0}" = 1 ]; then
    export NCL_FORCE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# packages the interpreter lacks, from the carried wheels (the machine has torch, numpy,
# packaging, PyYAML, einops; megatron-core, hydra-core, omegaconf and antlr4 travel)
missing=()
for pair in megatron.core:megatron_core hydra:hydra_core omegaconf:omegaconf \
            antlr4:antlr4_python3_runtime einops:einops; do
    module="${pair%%:*}" wheel="${pair##*:}"
    if ! "$PY" -c "import $module" 2>/dev/null; then
        found=("$REPO"/wheels/"$wheel"-*.whl)
        if [ ! -e "${found[0]}" ]; then
            echo "smoke: $module is missing and wheels/ has no $wheel wheel:" \
                 "run scripts/gpu/fetch_wheels.sh here and carry wheels/" >&2
            exit 2
        fi
        missing+=("${found[@]}")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir --no-compile \
        --disable-pip-version-check --target "$T/site" "${missing[@]}"
fi
export PYTHONPATH="$REPO:$T/site${PYTHONPATH:+:$PYTHONPATH}"

cd "$T"
"$PY" "$REPO/scripts/gpu/smoke.py" --report "$REPORT" --work "$T" \
    --installed "${#missing[@]}" ${SMOKE_CPU:+--cpu}
