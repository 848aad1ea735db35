"""Evaluations selectable as the ``eval`` config group, run by ``eval.py`` or at the end of ``train.py``.

Each evaluation is called as ``evaluation(model, tokenizer, out_dir, logger=None, datamodule=None, n=…, N=…)``
and returns flat metrics (``eval/ruler/<task>/<length>``, ``eval/ce/<lo>-<hi>``); it writes its table
(CSV + JSON) and a plot (PNG) under ``out_dir`` and logs metrics, the table and the plot to the logger.

* ``PositionPerplexity`` (``eval=ppl``): cross-entropy by position bucket (0–n, n–2n, …, up to N) on
  the held-out validation documents, which never contain RULER haystacks. The cheapest signal that
  context extension and weighting work: the buckets beyond n are where they show.
* ``Ruler`` (``eval=ruler``): the 13 RULER tasks (``lctw.eval.ruler``) per task and length.
* ``Harness`` (``eval=harness``): MMLU, BBH (short-context retention) and LongBench through lm-eval,
  on the user's local copies of the data.
* ``Suite`` (``eval=all``): several of them in turn.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _log(logger, metrics: dict, table=None, table_key: str = "", plot: Path | None = None) -> None:
    """Metrics to any Lightning logger; the table and the plot to W&B when it is the logger."""
    if not logger:
        return
    logger.log_metrics(metrics)
    if hasattr(logger, "log_table") and table is not None:
        logger.log_table(key=table_key, dataframe=table.reset_index())
    if hasattr(logger, "log_image") and plot is not None and plot.exists():
        logger.log_image(key=f"{table_key}_plot", images=[str(plot)])


def _plot(table, path: Path, xlabel: str, ylabel: str, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s written without its plot", path.name)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in table.columns:
        ax.plot(range(len(table.index)), table[column], marker="o", label=str(column))
    ax.set_xticks(range(len(table.index)), [str(i) for i in table.index], rotation=45, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(table.columns) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class PositionPerplexity:
    """Mean cross-entropy of targets grouped by how many tokens precede them, in buckets of ``bucket``."""

    def __init__(self, bucket: int | None = None, max_sequences: int = 64, batch_size: int = 2,
                 chunk_size: int | None = 1024):
        if bucket is not None and bucket < 1:
            raise ValueError(f"eval.bucket={bucket} is out of range: allowed >= 1 or null (= n)")
        if max_sequences < 1:
            raise ValueError(f"eval.max_sequences={max_sequences} is out of range: allowed >= 1")
        self.bucket, self.max_sequences = bucket, max_sequences
        self.batch_size, self.chunk_size = batch_size, chunk_size

    def table(self, model, sequences, n: int):
        """DataFrame indexed by bucket "lo-hi" (positions of the target token) with ce, ppl, tokens."""
        import pandas as pd

        from lctw.data import collate
        from lctw.scoring import model_logprobs

        width = self.bucket or n
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        device = next(model.parameters()).device
        rows = [sequences[i] for i in range(min(self.max_sequences, len(sequences)))]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), self.batch_size), desc="position perplexity"):
                batch = collate(rows[start : start + self.batch_size])
                ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
                nll = -model_logprobs(model, ids, self.chunk_size)
                bucket = torch.arange(1, ids.shape[1], device=device) // width  # target token position
                for b in bucket.unique().tolist():
                    sel = mask & (bucket == b)[None]
                    sums[b] = sums.get(b, 0.0) + float(nll[sel].sum())
                    counts[b] = counts.get(b, 0) + int(sel.sum())
        model.train(was_training)
        keys = sorted(k for k in counts if counts[k])
        ce = [sums[k] / counts[k] for k in keys]
        index = [f"{k * width}-{(k + 1) * width}" for k in keys]
        return pd.DataFrame({"ce": ce, "ppl": [float(torch.tensor(c).exp()) for c in ce],
                             "tokens": [counts[k] for k in keys]}, index=pd.Index(index, name="positions"))

    def __call__(self, model, tokenizer, out_dir, logger=None, datamodule=None, n: int = 0, **_) -> dict:
        if datamodule is None:
            raise ValueError("eval=ppl needs held-out documents: a data config (data=...) to read them from")
        datamodule.setup("validate")
        table = self.table(model, datamodule.val_set, n)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "position_ce.csv")
        plot = _plot(table[["ce"]], out / "position_ce.png", "target position", "cross-entropy (nats)",
                     f"CE by position (n = {n})")
        print(table.to_string(float_format=lambda x: f"{x:.4f}"))
        metrics = {f"eval/ce/{i}": float(v) for i, v in table["ce"].items()}
        (out / "position_ce.json").write_text(json.dumps(metrics, indent=2))
        _log(logger, metrics, table, "eval/position_ce", plot)
        return metrics


class Ruler:
    """RULER on the model's own tokenizer: tasks × lengths, greedy decoding, the reference metrics."""

    def __init__(self, tasks: list[str] | None = None, lengths: list[int] = (1024,), samples: int = 20,
                 batch_size: int = 8, seed: int = 42, chat_template: bool = False, data_dir: str | None = None):
        from lctw.eval.ruler import TASKS

        unknown = sorted(set(tasks or []) - set(TASKS))
        if unknown:
            raise ValueError(f"eval.tasks: unknown {unknown}; allowed {sorted(TASKS)} (or null = all 13)")
        if samples < 1 or not lengths or min(lengths) < 1:
            raise ValueError(f"eval.samples={samples} and eval.lengths={list(lengths)} must be positive")
        self.tasks, self.lengths, self.samples = list(tasks) if tasks else None, [int(x) for x in lengths], samples
        self.batch_size, self.seed, self.chat_template, self.data_dir = batch_size, seed, chat_template, data_dir

    def __call__(self, model, tokenizer, out_dir, logger=None, **_) -> dict:
        from lctw.eval.ruler import results_table, run_ruler, write_results

        results = run_ruler(model, tokenizer, self.tasks, self.lengths, self.samples, batch_size=self.batch_size,
                            seed=self.seed, chat_template=self.chat_template, data_dir=self.data_dir)
        out = Path(out_dir)
        print(write_results(results, out))
        table = results_table(results)
        plot = _plot(table.T, out / "ruler.png", "length (tokens)", "score", "RULER")
        metrics = {f"eval/ruler/{task}/{length}": float(score)
                   for task, by_len in results["scores"].items() for length, score in by_len.items()}
        metrics.update({f"eval/ruler/average/{length}": float(v) for length, v in results["average"].items()})
        _log(logger, metrics, table, "eval/ruler", plot)
        return metrics


class Harness:
    """MMLU / BBH / LongBench through lm-eval on local data (``lctw.eval.harness``): retention and LongBench."""

    def __init__(self, tasks: list[str], data_dir: str, num_fewshot: int = 0, limit: float | None = None,
                 batch_size: int = 1, chat_template: bool = False):
        if not tasks:
            raise ValueError("eval.tasks is empty: give e.g. [mmlu, bbh, longbench] or single tasks (mmlu_<subject>)")
        if not data_dir:
            raise ValueError("eval.data_dir is required: the directory holding your local mmlu/ bbh/ longbench/ data")
        self.tasks, self.data_dir, self.num_fewshot, self.limit = list(tasks), data_dir, num_fewshot, limit
        self.batch_size, self.chat_template = batch_size, chat_template

    def __call__(self, model, tokenizer, out_dir, logger=None, **_) -> dict:
        from lctw.eval.harness import results_table, run_harness, write_harness_results

        results = run_harness(model, tokenizer, self.tasks, self.data_dir, num_fewshot=self.num_fewshot,
                              limit=self.limit, batch_size=self.batch_size, apply_chat_template=self.chat_template)
        print(write_harness_results(results, out_dir))
        metrics = {f"eval/harness/{task}": float(r["score"]) for task, r in results["results"].items()}
        metrics.update({f"eval/harness/{group}": float(g["score"]) for group, g in results["groups"].items()})
        _log(logger, metrics, results_table(results).set_index("task"), "eval/harness")
        return metrics


class Suite:
    """Several evaluations in turn (``eval=all``)."""

    def __init__(self, **evaluations):
        self.evaluations = {k: v for k, v in evaluations.items() if v is not None}

    def __call__(self, model, tokenizer, out_dir, **kwargs) -> dict:
        metrics = {}
        for name, evaluation in self.evaluations.items():
            metrics.update(evaluation(model, tokenizer, Path(out_dir) / name, **kwargs))
        return metrics
