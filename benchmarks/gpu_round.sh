#!/usr/bin/env bash
# The GPU measurements of docs/gpu.md, on the current code, in one go, each bounded in time, logs under
# ${OUT:-gpu_results}/:  bash benchmarks/gpu_round.sh [throughput structures, default 8]
#
# Where torch_scatter/torch_sparse have no build for the installed torch (torch 2.11 on the lent GPU
# machines), benchmarks/stand_ins takes their place. Wheels in .whl/ are installed first, without
# dependencies (on those machines: fairchem-core 1.10.0, ase 3.23.0, lmdb<2, pydantic with
# pydantic-core, annotated-types and typing-inspection, downloaded elsewhere for Python 3.12).
set -o pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "gpu_round.sh: torch sees no CUDA GPU here" >&2; exit 1; }
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
STRUCTURES=${1:-8}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
paths=$PWD/src:$PWD/benchmarks
python3 -c "import torch_scatter, torch_sparse" 2>/dev/null || paths=$paths:$PWD/benchmarks/stand_ins
export PYTHONPATH=$paths${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS COMMAND...: output to the terminal and $OUT/NAME.log
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.log"
}
nvidia-smi -L
# the open question first (throughput, with CUDA graphs); all three within one 600 s device command
run throughput 400 python3 benchmarks/gpu_checks.py --checks throughput --structures "$STRUCTURES" --json "$OUT/throughput.json"
run autocast 120 python3 benchmarks/gpu_checks.py --checks autocast --json "$OUT/autocast.json"
run bf16_error 50 python3 benchmarks/bf16_error.py --device cuda --atoms 80 --structures 8
