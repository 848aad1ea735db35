"""The one validation layer: every entry point calls :func:`validate` (``eval.py``: :func:`validate_evaluation`)
before anything loads or is written. It keeps what belongs to no class of ours:

* **types** (``types.py``): every ``_target_`` node and the top-level keys (:data:`TRAIN_KEYS`,
  :data:`EVAL_KEYS`) against the constructors' annotations, never coerced; an unknown key gets the nearest
  valid one. Each constructor then checks its own values, reported under its key by :func:`build`;
* **ranges** of the top-level keys no class takes (:data:`RANGES`);
* **cross-key invariants** (n < N, a weighting that needs scores, a cache that needs a fixed scorer).

The owners check the rest: the Trainer, the machine, the global batch (:mod:`lctw.training.trainer`), θ' against
θ (:meth:`lctw.method.scorers.FixedScorer.check`), files (:mod:`lctw.runs.checkpoints`), devices
(:mod:`lctw.models.theta`), loss kernels (:mod:`lctw.method.kernels`).
No weights and no data are loaded; tokenizers are. May import the classes it checks and :mod:`lctw.runs.jobs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from lctw.config.types import ConfigError, build, check_keys, target_of
from lctw.errors import check_lowest, config_error
from lctw.method.kernels import KERNELS, check_loss
from lctw.models import DTYPES
from lctw.models.theta import check_model_path, resolve_device
from lctw.runs.jobs import run_token
from lctw.training.trainer import accumulation, check_trainer, resolve_accumulation, slurm_tasks

for _name, _resolver in (("div", lambda a, b: a / b),
                         # cached: Hydra copies a config's resolver cache into each job's config, so a job in another
                         # process (submitit, a requeued SLURM job) names the sweep directory as its launcher did
                         ("run_token", run_token),
                         ("accumulation", accumulation),  # the paper's 16 sequences per step on any number of GPUs
                         ("slurm_tasks", slurm_tasks)):  # SLURM's tasks per node (refuses devices=-1)
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=_name == "run_token")

# The top-level keys of conf/config.yaml (train.py, score.py) and conf/evaluate.yaml (eval.py); the
# groups are checked against their targets' constructors instead.
TRAIN_KEYS = {"n": int, "N": int, "seed": int, "name": str | None, "chunk_size": int | None,
              "loss": Literal[tuple(KERNELS)], "objective": str, "global_batch": int | None,
              "validate_first": bool, "ckpt_path": str | None, "checkpoint_every": int}
EVAL_KEYS = {"ckpt": str, "gguf_file": str | None, "dtype": Literal[tuple(DTYPES)], "device": str, "n": int,
             "N": int, "seed": int, "name": str | None, "chunk_size": int | None}

# Keys that no class of ours takes: the lowest value allowed, and what the message adds (lctw.errors.check_lowest)
RANGES = {"chunk_size": (1, ", or null (the full logits)"), "checkpoint_every": (1, " (optimizer steps)"),
          "scheduler.num_training_steps": (1, " (the step where the schedule ends; it follows trainer.max_steps, "
                                              "so set one of them)"),
          "scheduler.num_warmup_steps": (0, "")}


@dataclass
class Parts:
    """The cheap parts of a run, instantiated and checked; no weights loaded. ``base``: θ0's own measurements,
    filled by the base stage (:func:`lctw.training.stages.prepare`) and reported with the run as ``base/*``."""

    model_spec: Any
    scorer: Any
    weighting: Any
    context: Any
    tokenizer: Any
    base: dict = field(default_factory=dict)


def check_ranges(cfg: DictConfig) -> None:
    """:data:`RANGES`, and ``objective`` names a metric."""
    check_lowest(cfg, RANGES)
    if cfg.get("objective") is not None and not re.fullmatch(r"(val|train|eval)/\S+", cfg.objective):
        raise ConfigError(f"objective={cfg.objective} is not a metric name: allowed a key of metrics.json, e.g. "
                          "val/ce, val/ce_beyond_n, val/ppl, train/loss, eval/ruler/average/<length>")


def check_lengths(cfg: DictConfig) -> None:
    n, big_n = cfg.n, cfg.N
    if n < 2:
        raise ConfigError(f"n={n} is out of range: allowed 2 <= n < N (the short context)")
    if n > big_n or (n == big_n and cfg.context.get("method") != "none"):
        raise ConfigError(f"n={n} must be smaller than N={big_n}: allowed 2 <= n < N (context extension n -> N; "
                          "N = n only for the base stage: context=none scorer=none)")


def validate(cfg: DictConfig, for_cache: bool = False) -> Parts:
    """Check types, then instantiate the cheap parts (their constructors check their own keys) and check
    what joins them.

    ``for_cache``: the configuration fills a score cache (``score.py``), so the scorer must be fixed; the
    trainer's accelerator is then not checked against this machine (``score.py`` does not train).
    """
    # before the types: scorer=self takes no cache key, and "needs a fixed scorer" says why
    scorer_class, cached = target_of(cfg.scorer, "scorer"), cfg.scorer.get("cache")
    if (cached or for_cache) and not scorer_class.fixed:
        what = "score.py" if for_cache else f"scorer.cache={cached}"
        raise ConfigError(f"{what} needs a fixed scorer: allowed scorer=frozen or scorer=small (scorer="
                          f"{scorer_class.name} changes during training or has no scores, so its log-probs cannot "
                          "be cached)")
    resolve_accumulation(cfg)
    check_keys(cfg, TRAIN_KEYS)
    if cfg.get("trainer") is not None:  # first: the scheduler's steps follow trainer.max_steps
        check_trainer(cfg, machine=not for_cache)
        with config_error():
            check_loss(cfg.get("loss", "auto"), cfg.trainer.get("accelerator", "auto"))
    check_ranges(cfg)
    check_lengths(cfg)
    if cfg.get("nonfinite") is not None:
        from lctw.training.module import check_nonfinite

        with config_error("nonfinite"):
            check_nonfinite(cfg.nonfinite.policy, cfg.nonfinite.max_skipped)
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last" and "://" not in cfg.ckpt_path:  # remote: Lightning reads it
        from lctw.runs.checkpoints import check_file  # here: it brings Lightning

        check_file("ckpt_path", cfg.ckpt_path)
    weighting = build(cfg.weighting, "weighting")
    context = build(cfg.context, "context")
    scorer = build(cfg.scorer, "scorer")
    if weighting.needs_scores and not scorer.produces_scores:
        raise ConfigError(f"weighting={weighting.name} needs a scorer: scorer=none allows only weighting=uniform")
    model_spec = build(cfg.model, "model")
    if cfg.get("eval"):
        build(cfg.eval, "eval")  # the evaluation's options are checked before training starts
    build(cfg.data, "data")  # its constructor checks its options; the documents are read later
    tokenizer = model_spec.tokenizer()
    if scorer.fixed:
        with config_error():
            scorer.check(model_spec, tokenizer)
    return Parts(model_spec, scorer, weighting, context, tokenizer)


def validate_evaluation(cfg: DictConfig):
    """``eval.py``'s configuration, before any model or data loads; returns the built evaluation."""
    check_keys(cfg, EVAL_KEYS)
    check_model_path("ckpt", cfg.ckpt, cfg.get("gguf_file"))
    resolve_device(cfg.device, "device")
    return build(cfg.eval, "eval")
