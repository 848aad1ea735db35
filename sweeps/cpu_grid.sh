#!/usr/bin/env bash
# The 2x2 grid of the paper's main comparison on the CPU default: dense/sparse x frozen/self.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m weighting=dense,sparse scorer=frozen,self "$@"
