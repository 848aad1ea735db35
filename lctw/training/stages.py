"""The stages an entry point chains: θ0 first (the base stage), then the run it is for.

    python train.py                 # train(): θ0 of model=tiny, built once and cached, then the run

A model spec is data plus a loader; it never trains anything. Where a run needs a θ0 that is built
here (``model=tiny``, or a tiny ``scorer.model``), :func:`prepare` runs the base stage
(:mod:`lctw.training.base`) before any model is built, as litgpt chains pretraining and fine-tuning
through a checkpoint directory. ``train.py``, ``score.py`` and the token view call it after the
configuration is validated, so a bad option is refused before anything is built or written.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from lctw.config import Parts, validate
from lctw.training import base
from lctw.training.experiment import run


def prepare(parts: Parts) -> Parts:
    """Build (or find) θ0 for every spec of ``parts`` that the base stage builds, and keep θ0's own
    measurements in ``parts.base``; returns ``parts``."""
    parts.base = base.prepare(parts.model_spec)
    if parts.scorer.fixed:
        source = parts.scorer.source(parts.model_spec)
        if source is not parts.model_spec:
            base.prepare(source)
    return parts


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """``train.py``'s job: validate, the stages the configuration needs, then its run."""
    return run(cfg, run_dir, parts=prepare(validate(cfg)))
