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
    if cfg.get("eval"):
        _build(cfg.eval)  # validates the evaluation's options before training starts
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
        before = {}
        if cfg.get("validate_first") and not cfg.get("ckpt_path"):
            # θ right after context extension, before any training: the baseline the run improves on
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
            before = {f"{k}_before": float(v) for k, v in (results[0] if results else {}).items()}
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics.update(before)
        if trainer.is_global_zero:
            hf_dir = run_dir / "hf"
            module.model.save_pretrained(hf_dir)
            parts.tokenizer.save_pretrained(hf_dir)
            if cfg.get("eval"):
                evaluation = _build(cfg.eval)
                metrics.update(evaluation(module.model, parts.tokenizer, run_dir / "eval", logger=logger,
                                          datamodule=datamodule, n=cfg.n, N=cfg.N))
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("run finished: %s", json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("val")}))
        return metrics
    finally:
        loggers.finish()


def load_for_eval(cfg: DictConfig):
    """(model, tokenizer, the run's config or None) for ``cfg.ckpt``: a run dir, a .ckpt or an HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lctw.models import DTYPES

    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not allowed: choose one of {list(DTYPES)}")
    path = Path(str(cfg.ckpt)).expanduser()
    run_dir = path.parent.parent if path.suffix == ".ckpt" else path
    saved = run_dir / ".hydra" / "config.yaml"
    run_cfg = OmegaConf.load(saved) if saved.exists() else None
    if path.suffix == ".ckpt":
        if run_cfg is None:
            raise ValueError(f"ckpt={path}: no .hydra/config.yaml in {run_dir} to rebuild the model from")
        spec = _build(run_cfg.model)
        model = spec.load()
        _build(run_cfg.context).apply(model)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        tokenizer = spec.tokenizer()
        model.to(DTYPES[cfg.dtype])
    else:
        source = path / "hf" if (path / "hf" / "config.json").exists() else (path if path.exists() else str(cfg.ckpt))
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.get("gguf_file") else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[cfg.dtype], **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, run_cfg


def evaluate(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """``eval.py``: evaluate ``cfg.ckpt`` with ``cfg.eval``; results go under the run (or Hydra) directory."""
    evaluation = _build(cfg.eval)  # options are checked before any model loads
    model, tokenizer, run_cfg = load_for_eval(cfg)
    n, big_n, data_cfg = cfg.n, cfg.N, cfg.data
    if run_cfg is not None:  # the run's own lengths and held-out documents
        n, big_n = run_cfg.n, run_cfg.N
        run_cfg.paths.cache = cfg.paths.cache
        data_cfg = run_cfg.data  # interpolations resolve against the run's own config
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    datamodule = _build(data_cfg, tokenizer=tokenizer)
    logger = None
    try:
        logger = instantiate(cfg.logger, _partial_=True)(save_dir=str(out_dir), name=run_name(cfg), group=None,
                                                         hparams=OmegaConf.to_container(cfg, resolve=True))
        metrics = evaluation(model, tokenizer, out_dir / "eval", logger=logger, datamodule=datamodule, n=n, N=big_n)
        (out_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("evaluation written to %s", out_dir / "eval")
        return metrics
    finally:
        loggers.finish()


def score(cfg: DictConfig) -> Path:
    """``score.py``: score the train split with the configured frozen/small scorer into its cache."""
    import torch

    from lctw.cache import ScoreCache, cache_dir, fingerprint, score_rows, scorer_spec
    from lctw.models import TinyLlama

    parts = build_parts(cfg)
    spec = scorer_spec(parts.scorer, parts.model_spec)
    opts = cfg.get("score") or {}
    datamodule = _build(cfg.data, tokenizer=parts.tokenizer)
    datamodule.setup("fit")
    train = datamodule.train_set
    if isinstance(spec, TinyLlama) and not (spec.path / "config.json").exists():
        spec.pretrain()  # the tiny base is built on first use; its weights are part of the fingerprint
    fp = fingerprint(parts.scorer, parts.model_spec, parts.tokenizer, train, datamodule.fingerprints["train"])
    cache = ScoreCache(cache_dir(cfg, fp))
    cache.create(fp)
    if cache.complete:
        log.info("score cache already complete: %s", cache.path)
        print(cache.path)
        return cache.path
    device = opts.get("device", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model = spec.load().eval().requires_grad_(False).to(device)
    done = score_rows(parts.scorer, model, train, cache, batch_size=int(opts.get("batch_size", 8)),
                      limit=opts.get("limit"), shard_rows=int(opts.get("shard_rows", 256)),
                      num_workers=int(cfg.data.get("num_workers", 0)))
    state = "complete" if cache.complete else f"stopped at {done} of {len(train)} rows; rerun to continue"
    log.info("score cache %s: %s", state, cache.path)
    print(cache.path)
    return cache.path
