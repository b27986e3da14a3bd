#!/usr/bin/env bash
# Create .venv and install clipsel_jax from this repository's own files.
#   bash scripts/setup.sh          the library and the `clipsel` command
#   bash scripts/setup.sh --test   also pytest, scikit-image and torch (parity tests, legacy .bin/.pt checkpoints)
# PYTHON=python3.12 bash scripts/setup.sh picks another interpreter (3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # torch pinned to the CPU build first, so the [torch] extra's range is already satisfied (no CUDA download).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,torch]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -c "import clipsel_jax, jax; print('clipsel_jax', clipsel_jax.__version__, 'jax', jax.__version__, jax.devices())"
