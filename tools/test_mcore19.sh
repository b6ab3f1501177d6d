#!/usr/bin/env bash
# Second test tier, run on demand (not in CI): the tests that touch Megatron-Core, under Megatron-Core 0.19.x on
# Python 3.12, plus checkpoints crossing 0.16.1 <-> 0.19.x in both directions.
#
#   bash tools/test_mcore19.sh [more pytest arguments]
#
# * The Python 3.12 virtualenv lives outside the repository, in $MEGATRON_PZ_PY312_VENV (default
#   ~/.cache/megatron_pz/py312-mcore19). The first run creates it and installs through tools/install.sh (which picks
#   megatron-core 0.19.2 for Python >= 3.12): about 5 GB, as PyPI's torch for 3.12 is the CUDA build (it runs on
#   CPU). Later runs only re-check the installation.
# * Python 3.12 comes from $PYTHON312, else `python3.12` on PATH, else pyenv's newest 3.12.
# * The cross-version checkpoint test needs the other release: $MEGATRON_PZ_OTHER_PYTHON, else `python3.11`,
#   used only if it imports megatron-core 0.16.x (the default tier's environment); otherwise that test skips.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_PZ_PY312_VENV:-$HOME/.cache/megatron_pz/py312-mcore19}
is_312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
if [ ! -x "$VENV/bin/python" ]; then
  PY312=${PYTHON312:-}
  if [ -z "$PY312" ]; then
    # A `python3.12` on PATH may be a pyenv shim that refuses to run (3.12 installed, not selected): try it.
    for cand in "$(command -v python3.12 || true)" \
        $(find "$HOME/.pyenv/versions" -maxdepth 3 -path '*/3.12*/bin/python3.12' 2>/dev/null | sort -rV); do
      if is_312 "$cand"; then PY312=$cand; break; fi
    done
  fi
  is_312 "$PY312" || { echo "test_mcore19.sh: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 2; }
  "$PY312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PYTHON="$PY" INSTALL_EXTRAS=0 bash tools/install.sh

OTHER=${MEGATRON_PZ_OTHER_PYTHON:-$(command -v python3.11 || true)}
if [ -n "$OTHER" ] && "$OTHER" -c 'import megatron.core as m, sys; sys.exit(not m.__version__.startswith("0.16."))' \
    2>/dev/null; then
  export MEGATRON_PZ_OTHER_PYTHON="$OTHER"
else
  unset MEGATRON_PZ_OTHER_PYTHON
  echo "test_mcore19.sh: no interpreter with megatron-core 0.16.x; the cross-version checkpoint test will skip" >&2
fi
"$PY" -c 'import megatron.core as m, sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")'

# The Megatron-touching tests: CPU device layer, model build and vocab-parallel log-probs, parity with HF at TP/PP,
# checkpoint save/load/reshard and Megatron-LM layout, conversion round trips, the train entry point at TP1 and
# at TP2 (two ranks), and checkpoints across releases.
export OMP_NUM_THREADS=1
exec nice -n 10 "$PY" -m pytest -q -rs --durations=15 \
  tests/unit/test_device.py \
  tests/unit/test_provider.py \
  tests/unit/test_logprobs.py \
  tests/unit/test_mcore_compat.py \
  tests/distributed/test_megatron_parity.py \
  tests/distributed/test_checkpoint.py \
  tests/distributed/test_megatron_lm_checkpoint.py \
  tests/e2e/test_convert_cli.py \
  "tests/e2e/test_train_e2e.py::test_pretrainzero_tp1_two_steps" \
  "tests/e2e/test_train_e2e.py::test_random_span_two_ranks_trains[tp2]" \
  tests/mcore_versions/test_cross_version_checkpoints.py \
  "$@"
