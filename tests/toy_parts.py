"""Toy parts that the README's "add your own" recipes add from outside the package (test_recipes.py).

Each is one class here plus one YAML in a config directory given to train.py with hydra.searchpath.
"""

from __future__ import annotations

import json
import os
import signal
import signal as signal_module

import torch
from lightning.pytorch.callbacks import Callback

from lctw.method.context import ContextExtension
from lctw.method.scorers import Scorer
from lctw.method.weighting import Weighting


class UnigramScorer(Scorer):
    """θ' with no context at all: each token's log relative frequency in its own sequence (add-one)."""

    name = "unigram"

    def forward(self, theta, batch, long_logprobs):
        ids = batch["input_ids"]
        vocab = theta.config.vocab_size
        counts = torch.ones(ids.shape[0], vocab, device=ids.device).scatter_add_(
            1, ids, torch.ones_like(ids, dtype=torch.float32))
        logp = counts.log() - counts.sum(-1, keepdim=True).log()
        return logp.gather(1, ids[:, 1:])


class Tempered(Weighting):
    """w = M · softmax(s / temperature) per sequence, s = |short - long|."""

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is out of range: allowed > 0")
        self.temperature = float(temperature)

    def weights(self, long_lp, short_lp, mask):
        s = (short_lp - long_lp).abs() / self.temperature
        s = s.masked_fill(~mask, float("-inf"))
        return mask.sum(-1, keepdim=True) * torch.softmax(s, dim=-1)


class ScaledTheta(ContextExtension):
    """RoPE base times a fixed ``scale`` (a toy ABF rule)."""

    def __init__(self, max_len: int, n: int, scale: float = 8.0):
        super().__init__("theta", max_len, n)
        self.scale = float(scale)

    def rope_parameters(self, config) -> dict:
        return {**config.rope_parameters, "rope_theta": config.rope_parameters["rope_theta"] * self.scale}


class Crash(Callback):
    """Fault injection: at optimizer step ``step``, SIGKILL this process's whole group (``how=kill``: a
    preempted node, where W&B's service process dies with the run) or raise (``how=raise``, in-process)."""

    def __init__(self, step: int, how: str = "kill"):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.how == "kill":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            raise RuntimeError(f"injected crash at step {self.step}")


class Signal(Callback):
    """Fault injection: send ``signal`` (a name without SIG) to this process when batch ``batch`` starts, i.e.
    in the middle of a step, as SLURM's warning arrives; ``rank``: only on that rank (null: on every rank)."""

    def __init__(self, batch: int, signal: str = "USR2", rank: int | None = None):
        self.batch, self.signum, self.rank = batch, getattr(signal_module, f"SIG{signal}"), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class RecordBatches(Callback):
    """Appends each training batch's step and rows (their first token ids after BOS) to
    ``<run dir>/batches-rank<r>.jsonl``: what each rank trained on, step by step, across restarts."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = os.path.join(trainer.default_root_dir, f"batches-rank{trainer.global_rank}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": batch["input_ids"][:, 1:9].tolist()}) + "\n")
