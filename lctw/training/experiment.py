"""One training run from a composed Hydra config: validate, build the parts, fit, save.

    python train.py                        # the default experiment (builds the tiny base on first use)
    python train.py experiment=base        # the base stage is a run like any other
    python train.py experiment=base_copy   # a run in phases (lctw.training.phases), each a run()

``train.py`` runs it through :func:`lctw.training.stages.train`, which builds θ0 first when it is
not cached (the base stage, itself a :func:`run`). Everything that can be checked without weights is checked first
(:func:`lctw.config.validate`), so a bad option stops the run before any model loads or anything is
written. The order below matters: the data and a score cache are checked before θ loads; θ before the
run's own logger starts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lctw.config import ConfigError, Parts, build, validate
from lctw.models.theta import build_theta, save_theta
from lctw.runs import loggers
from lctw.runs.checkpoints import VerifiedCheckpointIO, check_resume
from lctw.runs.jobs import read_metrics, write_metrics
from lctw.training.curve import LearningCurve
from lctw.training.distributed import gather_theta, is_sharded_module, receives_weights
from lctw.training.module import TokenWeightingLM
from lctw.training.phases import phase_configs, phase_dirs
from lctw.training.trainer import build_trainer

log = logging.getLogger(__name__)


def resume_point(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` (``last`` = this run directory's last.ckpt), or, when
    the run directory already holds ``checkpoints/last.ckpt`` (an interrupted run started again with the
    same ``hydra.run.dir``), that one: the run continues where it stopped, in the same directory."""
    last = run_dir / "checkpoints" / "last.ckpt"
    option = cfg.get("ckpt_path")
    if option == "last":
        if not last.exists():
            raise ConfigError(f"ckpt_path=last: {last} does not exist (give the run's directory as hydra.run.dir)")
        return str(last)
    if option is None and last.exists():
        log.info("resuming from %s (the run directory holds an interrupted run)", last)
        return str(last)
    return option


def run_phases(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """A phased run (:mod:`lctw.training.phases`): every phase validated first, then run in turn; returns the
    last phase's metrics."""
    configs = phase_configs(cfg, run_dir)
    parts = [validate(phase) for phase in configs]
    for k, (phase, phase_dir) in enumerate(zip(configs, phase_dirs(run_dir, len(configs)), strict=True)):
        log.info("phase %d of %d: %d steps, rows of %d tokens, batch %d (%s)", k + 1, len(configs),
                 phase.trainer.max_steps, phase.data.max_len, phase.data.batch_size, phase_dir)
        metrics = run(phase, phase_dir, parts[k])
    return metrics


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None, parts: Parts | None = None) -> dict[str, float]:
    """Train one configuration; returns the final metrics. W&B is finished whatever happens. ``parts``:
    :func:`lctw.config.validate`'s result when the caller validated already (the stages, after θ0)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    if cfg.get("phases"):
        return run_phases(cfg, run_dir)
    parts = parts or validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data, "data", tokenizer=parts.tokenizer)
    ckpt_path = resume_point(cfg, run_dir)
    if ckpt_path is not None:
        check_resume(ckpt_path, cfg)  # sound, and this run's θ: refused before any model loads
    scorer = parts.scorer
    if cfg.scorer.get("cache"):  # live or cached: θ' log-probs read from score.py's cache, θ' never loaded
        from lctw.cache import attach

        scorer = attach(cfg, parts, datamodule)
    try:
        meta = receives_weights(cfg.trainer)  # trainer=fsdp: only rank 0 loads weights, the others get its shards
        model = build_theta(parts.model_spec, parts.context, meta=meta)
        scorer.setup(parts.model_spec, meta=meta)
        config = OmegaConf.to_container(cfg, resolve=True)
        logger = loggers.build(cfg, run_dir)
        module = TokenWeightingLM(model, scorer, parts.weighting, n=cfg.n, optimizer=instantiate(cfg.optimizer),
                                  scheduler=instantiate(cfg.scheduler), chunk_size=cfg.chunk_size,
                                  loss=cfg.loss, config=config,
                                  nonfinite=cfg.nonfinite.policy, max_skipped=cfg.nonfinite.max_skipped)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        trainer = build_trainer(cfg, run_dir, logger, callbacks, plugins=[VerifiedCheckpointIO()])
        before = read_metrics(run_dir / "metrics.json", suffix="_before")  # measured before an interruption
        if cfg.get("validate_first") and ckpt_path is None:
            # θ right after context extension, before any training: the baseline the run improves on
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
            before = {f"{k}_before": float(v) for k, v in (results[0] if results else {}).items()}
            if trainer.is_global_zero:
                write_metrics(run_dir / "metrics.json", before)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics.update(before)
        for cb in callbacks:
            if isinstance(cb, LearningCurve):  # its points, <metric>@<step>, are part of the result
                metrics.update(cb.metrics)
        metrics.update(parts.base)  # what θ0 could do: part of the result
        theta = module.model
        if is_sharded_module(theta):  # trainer=fsdp: every rank gathers, rank 0 exports the full θ
            full = gather_theta(theta)
            if trainer.is_global_zero:
                theta = build_theta(parts.model_spec, parts.context, weights=False)
                theta.load_state_dict(full)
        if trainer.is_global_zero:
            save_theta(theta, parts.tokenizer, run_dir / "hf", config)
            if cfg.get("eval"):
                evaluation = build(cfg.eval, "eval")
                metrics.update(evaluation(module.model, parts.tokenizer, run_dir / "eval", logger=logger,
                                          datamodule=datamodule, n=cfg.n, N=cfg.N))
            write_metrics(run_dir / "metrics.json", metrics)
        log.info("run finished: %s", json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("val")}))
        return metrics
    finally:
        loggers.finish()
