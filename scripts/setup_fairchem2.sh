#!/usr/bin/env bash
# Build the second environment, for fairchem-core 2.x, in ./.venv-fairchem2 (or $VENV2):
#   torch 2.13.0 (installed first and explicitly, since a bare `torch` requirement could pull a
#   multi-GB CUDA build; TORCH2_SPEC=... for another build), fairchem-core 2.x, pytest, and this
#   plugin with its fairchem2 extra. fairchem 1.x and 2.x cannot share one environment:
#   scripts/setup.sh builds the 1.10 one in ./.venv.
# TORCH2_INDEX_URL=... takes torch from another package index, e.g. PyTorch's CPU-only one
# (https://download.pytorch.org/whl/cpu): from PyPI alone torch 2.13 for Linux is a CUDA build that
# pulls the CUDA 13 libraries (a 5.9 GB environment).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV2=${VENV2:-.venv-fairchem2}
PYTHON=${PYTHON:-python3}
TORCH2_SPEC=${TORCH2_SPEC:-torch==2.13.0}
TORCH2_INDEX_URL=${TORCH2_INDEX_URL:-}
FAIRCHEM2_SPEC=${FAIRCHEM2_SPEC:-fairchem-core~=2.24.0}

if [ ! -x "$VENV2/bin/python" ]; then
    echo "==> creating virtual environment $VENV2"
    "$PYTHON" -m venv "$VENV2"
fi
PY="$VENV2/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

echo "==> pip, wheel"
pip_install -q --upgrade pip wheel

# Install torch on its own first, at the exact version, so that nothing later resolves a bare
# `torch` requirement to a CUDA build.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH2_SPEC#torch==}' else 1)" 2>/dev/null; then
    echo "==> installing $TORCH2_SPEC${TORCH2_INDEX_URL:+ from $TORCH2_INDEX_URL}"
    pip_install ${TORCH2_INDEX_URL:+--index-url "$TORCH2_INDEX_URL"} "$TORCH2_SPEC"
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"

# fairchem-core 2.x with torch held at the version just installed (a constraint, so pip can only
# keep it). Skipped when the installed fairchem-core already satisfies the spec.
if ! "$PY" - "$FAIRCHEM2_SPEC" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version(req.name), prereleases=True) else 1)
PY
then
    echo "==> installing $FAIRCHEM2_SPEC (torch held at $TORCH2_SPEC)"
    pip_install -c "$constraints" "$FAIRCHEM2_SPEC" pytest pytest-timeout
fi

echo "==> installing fairchem-equiformerv2 with its fairchem2 extra (torch held)"
pip_install -q -c "$constraints" -e ".[fairchem2]"

"$PY" - <<'PY'
from importlib.metadata import version
import fairchem.core, torch, numpy, ase
import fairchem_equiformerv2
assert fairchem_equiformerv2.EquiformerV2Backbone.__module__ == "fairchem_equiformerv2.adapters.fairchem2"
print(f"fairchem 2.x environment ready: torch {torch.__version__}, "
      f"fairchem-core {fairchem.core.__version__}, numpy {numpy.__version__}, ase {ase.__version__}, "
      f"fairchem-equiformerv2 {version('fairchem-equiformerv2')}")
PY
