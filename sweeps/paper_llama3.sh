#!/usr/bin/env bash
# The paper's Llama-3 8B grid (GPU): weighting x scorer at 8k -> 32k, then RULER at the end of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m experiment=paper_llama3 weighting=uniform scorer=none eval=ruler eval.lengths=[4096,8192,16384,32768] eval.samples=500 "$@"
python train.py -m experiment=paper_llama3 weighting=dense,sparse scorer=frozen,self eval=ruler eval.lengths=[4096,8192,16384,32768] eval.samples=500 "$@"
