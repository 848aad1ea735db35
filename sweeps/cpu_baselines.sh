#!/usr/bin/env bash
# Uniform baseline and the weighting variants on the CPU default, all with the frozen scorer.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m scorer=none weighting=uniform "$@"
python train.py -m scorer=frozen weighting=dense,sparse,longce,ppmi,npmi "$@"
