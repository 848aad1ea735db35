"""One training run from a composed Hydra config: validate, build the parts, fit, save.

``train.py`` is the Hydra entry point and calls :func:`run`. Everything that can be checked without
weights is checked first (:func:`build_parts`): each part's constructor validates its own keys, and
the small scorer's tokenizer is compared with the model's, so a bad option stops the run before any
model loads or anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lctw import loggers
from lctw.module import TokenWeightingLM

log = logging.getLogger(__name__)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: a / b)


_register_resolvers()


@dataclass
class Parts:
    model_spec: Any
    scorer: Any
    weighting: Any
    context: Any
    tokenizer: Any


def check_lengths(cfg: DictConfig) -> None:
    n, big_n = cfg.n, cfg.N
    if not isinstance(n, int) or not isinstance(big_n, int) or n < 2:
        raise ValueError(f"n={n} and N={big_n} must be integers with n >= 2")
    if n >= big_n:
        raise ValueError(f"n={n} must be smaller than N={big_n}: allowed 2 <= n < N (context extension n -> N)")


def _build(node: DictConfig, **kwargs):
    """instantiate(), re-raising a constructor's own ValueError (which names the key) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def build_parts(cfg: DictConfig) -> Parts:
    """Instantiate the cheap parts (their constructors validate) and check vocabularies; no weights."""
    check_lengths(cfg)
    weighting = _build(cfg.weighting)
    context = _build(cfg.context)
    scorer = _build(cfg.scorer)
    model_spec = _build(cfg.model)
    tokenizer = model_spec.tokenizer()
    if getattr(scorer, "spec", None) is not None:
        small_vocab = scorer.spec.tokenizer().get_vocab()
        if small_vocab != tokenizer.get_vocab():
            raise ValueError(
                f"scorer=small: scorer.model ({scorer.spec.describe()}) has a different vocabulary "
                f"({len(small_vocab)} tokens) from model ({model_spec.describe()}, {len(tokenizer)} tokens); "
                "the small scorer must use the same tokenizer"
            )
    if weighting.needs_scores and not scorer.uses_model:
        raise ValueError(f"weighting={weighting.name} needs a scorer: scorer=none allows only weighting=uniform")
    return Parts(model_spec, scorer, weighting, context, tokenizer)


def run_name(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("name"):
        return str(cfg.name)
    if HydraConfig.initialized():
        return HydraConfig.get().job.override_dirname or "default"
    return "default"


def run_group(cfg: DictConfig) -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Train one configuration; returns the final metrics. W&B is finished whatever happens."""
    parts = build_parts(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _build(cfg.data, tokenizer=parts.tokenizer)
    if getattr(parts.scorer, "cache", False):  # θ0's scores from score.py's cache: θ0 is never loaded
        from lctw.cache import use_cache

        parts.scorer = use_cache(cfg, parts, datamodule)
    try:
        # Called, not instantiated with the config as a kwarg: Hydra would instantiate its _target_s.
        logger = instantiate(cfg.logger, _partial_=True)(save_dir=str(run_dir), name=run_name(cfg),
                                                         group=run_group(cfg),
                                                         hparams=OmegaConf.to_container(cfg, resolve=True))
        model = parts.model_spec.load()
        module = TokenWeightingLM(model, parts.scorer, parts.weighting, parts.context, n=cfg.n,
                                  optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                                  chunk_size=cfg.chunk_size)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(run_dir / "checkpoints")
        trainer = instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks,
                              default_root_dir=str(run_dir))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if trainer.is_global_zero:
            hf_dir = run_dir / "hf"
            module.model.save_pretrained(hf_dir)
            parts.tokenizer.save_pretrained(hf_dir)
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("run finished: %s", json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("val")}))
        return metrics
    finally:
        loggers.finish()
