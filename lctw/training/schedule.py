"""The learning-rate schedule that a phased base stage needs: warm-up, constant, then a cosine decay.

Why: the copying base trains in phases (short rows, then rows of n; :mod:`lctw.training.phases`), each
an ordinary run, yet the schedule is one schedule over all of them. The learning rate stays at its peak
while the induction circuit forms and decays only at the end, as in the measured recipe (a cosine over
the whole run decays too early: formation takes 1–2M tokens). ``start_step`` is where a phase starts in
the whole schedule; ``num_training_steps`` is the steps of all phases together.

    lr(s) / peak = (s + 1) / warmup                        for s < warmup
                 = 1                                       until (1 - decay_fraction) · total
                 = r + (1 - r) · (1 + cos(π q)) / 2        after it, q the decay's progress, r = final_lr_ratio
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupStableDecay:
    """``scheduler=wsd``: called with the optimizer, returns its ``LambdaLR`` (stepped every optimizer step)."""

    def __init__(self, num_warmup_steps: int, num_training_steps: int, decay_fraction: float = 0.25,
                 final_lr_ratio: float = 0.1, start_step: int = 0):
        if num_warmup_steps < 0 or num_training_steps < 1:
            raise ValueError(f"num_warmup_steps={num_warmup_steps}, num_training_steps={num_training_steps}: allowed "
                             "num_warmup_steps >= 0 and num_training_steps >= 1")
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction={decay_fraction} is out of range: allowed [0, 1]")
        if not 0 <= final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio={final_lr_ratio} is out of range: allowed [0, 1]")
        if not 0 <= start_step < num_training_steps:
            raise ValueError(f"start_step={start_step} is out of range: allowed [0, num_training_steps)")
        self.warmup, self.total, self.start = num_warmup_steps, num_training_steps, start_step
        self.decay_fraction, self.final = decay_fraction, final_lr_ratio

    def factor(self, step: int) -> float:
        """lr / peak at ``step`` of the whole schedule."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_start = (1 - self.decay_fraction) * self.total
        if step < decay_start:
            return 1.0
        q = min(1.0, (step - decay_start) / max(1e-9, self.total - decay_start))
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * q))

    def __call__(self, optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: self.factor(step + self.start))
