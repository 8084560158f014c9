#!/usr/bin/env bash
# Fetch, here (network), the wheels scripts/gpu/smoke.sh installs on the GPU machine (no
# network there): megatron-core and the project's pure-Python dependencies that the
# machine's image lacks, for CPython 3.12 on x86-64 Linux. They land in wheels/ (ignored
# by git) and travel with the device tool's `carry: ["wheels"]` (about 3 MB).
#
#   bash scripts/gpu/fetch_wheels.sh            # then: run(carry=["wheels"], ...)
#
# Versions: the CPU pins (requirements/pins.txt). megatron-core 0.16.1 is the newest that
# the rest of the package is written against (pyproject: <0.17) and it ships a cp312 wheel
# (Requires-Python >=3.10, torch>=2.6: the machine's torch 2.11 qualifies).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
DEST=wheels
mkdir -p "$DEST"
pin() { sed -n "s/^$1==//p" requirements/pins.txt; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --dest "$DEST" --quiet --disable-pip-version-check)
"$PY" -m pip download "${common[@]}" "${PLAT[@]}" "megatron-core==$(pin megatron-core)"
"$PY" -m pip download "${common[@]}" "hydra-core==$(pin hydra-core)" \
    "omegaconf==$(pin omegaconf)" "einops==$(pin einops)"
# hydra and omegaconf need antlr4-python3-runtime 4.9.x, published as a source archive
# only: build its (pure-Python) wheel here
"$PY" -m pip wheel --no-deps --quiet --disable-pip-version-check -w "$DEST" \
    "antlr4-python3-runtime==4.9.3"
ls -1 "$DEST"
du -sh "$DEST"
