"""``eval.py``: evaluate a run, a checkpoint or any Hugging Face model with the ``eval`` config group.

    python eval.py ckpt=outputs/runs/<date>/<time> eval=ruler eval.lengths=[1024,2048]
    python eval.py ckpt=<run>/checkpoints/last.ckpt eval=ppl
    python eval.py ckpt=meta-llama/Meta-Llama-3-8B eval=ruler dtype=bfloat16

θ is rebuilt by :func:`lctw.models.theta.load_theta` from what the run wrote. With a run of lctw, n, N and
the held-out documents are that run's own; with a model from elsewhere, the ``n``, ``N`` and ``data``
of ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from lctw.config import build, validate_evaluation
from lctw.models.theta import load_theta, resolve_device
from lctw.runs import loggers
from lctw.runs.jobs import write_metrics

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Evaluate ``cfg.ckpt`` with ``cfg.eval``; results go under ``out_dir`` (the Hydra run directory)."""
    evaluation = validate_evaluation(cfg)  # ckpt, dtype, device and the evaluation's options, before any load
    model, tokenizer, run_cfg = load_theta(cfg.ckpt, cfg.dtype, cfg.get("gguf_file"))
    model = model.to(resolve_device(cfg.device))
    n, big_n, data_cfg = cfg.n, cfg.N, cfg.data
    if run_cfg is not None:  # the run's own lengths and held-out documents
        n, big_n, data_cfg = run_cfg.n, run_cfg.N, run_cfg.data
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    # the run's data, tokenized into this installation's cache
    datamodule = build(data_cfg, "data", tokenizer=tokenizer, cache_dir=cfg.paths.cache)
    try:
        logger = loggers.build(cfg, out_dir, group=False)
        metrics = evaluation(model, tokenizer, out_dir / "eval", logger=logger, datamodule=datamodule, n=n, N=big_n)
        write_metrics(out_dir / "eval_metrics.json", metrics)
        log.info("evaluation written to %s", out_dir / "eval")
        return metrics
    finally:
        loggers.finish()
