"""Runs ``benchmarks/gpu_smoke.py`` under torchrun with an out-of-memory error injected on one rank.

    torchrun --nproc_per_node 2 tests/gpu_smoke_oom.py <where> <ranks> benchmarks/gpu_smoke.py --cpu-check ...

On the CPU no step really runs out of memory, so ``torch.OutOfMemoryError`` is raised where a GPU raises
it, during the ``scorer=self`` measurement, on the comma-separated ``<ranks>``:

* ``start``: as the training step begins, before its first collective: the other ranks then wait in the
  step's first all-gather for a rank that never comes (what a rank with less free memory does);
* ``optimizer``: in AdamW's step, after every collective of the training step has completed, so the other
  ranks finish the step and can agree on the outcome.

Everything else is the script itself (tests/test_gpu_smoke.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

WHERE, RANKS, SCRIPT = sys.argv[1], {int(r) for r in sys.argv[2].split(",")}, Path(sys.argv[3])
sys.path.insert(0, str(SCRIPT.resolve().parents[1]))

from lctw.method.scorers import SelfScorer  # noqa: E402
from lctw.training.module import TokenWeightingLM  # noqa: E402

measuring_self = []  # non-empty while this rank runs a scorer=self step
training_step, adamw_step = TokenWeightingLM.training_step, torch.optim.AdamW.step


def failing_training_step(self, batch, batch_idx):
    measuring_self[:] = [isinstance(self.scorer, SelfScorer) and int(os.environ["RANK"]) in RANKS]
    if WHERE == "start" and measuring_self[0]:
        raise torch.OutOfMemoryError("CUDA out of memory (injected at the start of the step)")
    return training_step(self, batch, batch_idx)


def failing_adamw_step(self, *args, **kwargs):
    if WHERE == "optimizer" and measuring_self and measuring_self[0]:
        raise torch.OutOfMemoryError("CUDA out of memory (injected in the optimizer step)")
    return adamw_step(self, *args, **kwargs)


TokenWeightingLM.training_step, torch.optim.AdamW.step = failing_training_step, failing_adamw_step
spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)
sys.exit(smoke.main(sys.argv[4:]))
