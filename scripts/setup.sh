#!/usr/bin/env bash
# Take a fresh machine to a working environment in ./.venv (or $VENV):
#   torch 2.4.x, torch_scatter/torch_sparse (a wheel from PIP_FIND_LINKS if one is given, else built
#   from source: CPU-only unless a GPU and nvcc are both present), fairchem-core 1.10 and this plugin
#   with its dev extras.
# TORCH_INDEX_URL=... takes torch from another package index, e.g. PyTorch's CPU-only one
# (https://download.pytorch.org/whl/cpu): the PyPI wheel for Linux is a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.4.1}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

echo "==> pip, wheel, setuptools"
pip_install -q --upgrade pip wheel setuptools

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.4.') else 1)" 2>/dev/null; then
    echo "==> installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (numpy<2)"
    pip_install "numpy<2"
    pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
fi

if ! "$PY" -c "import torch_scatter, torch_sparse" 2>/dev/null; then
    # A CUDA build needs both a visible GPU and a CUDA toolkit; anything else builds for the CPU.
    if [ -z "${FORCE_CUDA:-}" ] && ! { command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
        export FORCE_ONLY_CPU=1
        echo "==> torch_scatter/torch_sparse: CPU-only (no GPU or no nvcc here)"
    fi
    [ -n "${PIP_FIND_LINKS:-}" ] && echo "==> looking for prebuilt wheels in $PIP_FIND_LINKS"
    echo "==> installing torch_scatter and torch_sparse (a source build takes minutes)"
    pip_install --no-build-isolation "torch-scatter==2.1.2" "torch-sparse==0.6.18"
fi

echo "==> installing fairchem-equiformerv2 with its fairchem 1.x and dev extras"
pip_install -e ".[fairchem1,dev]"

"$PY" - <<'PY'
import fairchem.core, torch, torch_scatter, torch_sparse, e3nn
import fairchem_equiformerv2
print(f"environment ready: torch {torch.__version__}, fairchem-core {fairchem.core.__version__}, "
      f"e3nn {e3nn.__version__}, fairchem-equiformerv2 {fairchem_equiformerv2.__version__}")
PY
