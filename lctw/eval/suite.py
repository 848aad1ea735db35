"""The ``eval`` config group's evaluations, run by ``eval.py`` or at the end of ``train.py``.

Each evaluation is called as ``evaluation(model, tokenizer, out_dir, logger=None, datamodule=None, n=…, N=…)``
and returns flat metrics (``eval/ruler/<task>/<length>``, ``eval/ce/<lo>-<hi>``); it writes its table
(CSV + JSON) and, except for the harness, plots (PNG) under ``out_dir`` and logs metrics, the table and
the plots to the logger.
The classes here are thin adapters from that call to the benchmarks' own entry points, so the
benchmarks stay usable without Hydra:

* ``Ruler`` (``eval=ruler``): the 13 RULER tasks (``lctw.eval.ruler``) per task and length.
* ``Harness`` (``eval=harness``): MMLU, BBH (short-context retention) and LongBench, each in its
  official profile by default, on the user's local copies of the data (``lctw.eval.harness``).
* ``Suite`` (``eval=all``): several of them in turn.

``eval=ppl`` is ``lctw.eval.position.PositionPerplexity``, an evaluation of its own rather than an adapter.
"""

from __future__ import annotations

from pathlib import Path

from lctw.eval.report import log_results, save_ruler_plots
from lctw.eval.templates import Setting, allowed, is_setting

# The shortest RULER length (prompt and answer, in tokens). The needle tasks reserve 128 tokens for the
# answer and their instructions take about as many again: with the tiny model's tokenizer the first task
# (niah_single_2) fits from about 250 tokens, the other needle tasks from 275-450, fwe from 300, cwe from
# about 840 and vt from about 900. Below this minimum (nearly) every task would be recorded as an error
# and the evaluation would return empty metrics; a task that does not fit at an allowed length is
# reported in the results' errors.
MIN_LENGTH = 256


class Ruler:
    """RULER on the model's own tokenizer: tasks × lengths, greedy decoding, the reference metrics."""

    def __init__(self, tasks: list[str] | None = None, lengths: list[int] = (1024,), samples: int = 20,
                 batch_size: int = 8, seed: int = 42, chat_template: Setting = "auto", data_dir: str | None = None,
                 fit: str = "exact"):
        from lctw.eval.ruler import TASKS
        from lctw.eval.ruler.samples import check_fit

        unknown = sorted(set(tasks or []) - set(TASKS))
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; allowed {sorted(TASKS)} (or null = all 13)")
        if samples < 1:
            raise ValueError(f"samples={samples} is out of range: allowed >= 1")
        if not lengths or min(lengths) < MIN_LENGTH:
            raise ValueError(f"lengths={list(lengths)} is out of range: allowed lengths >= {MIN_LENGTH} tokens "
                             "(a shorter prompt cannot hold a RULER task)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is out of range: allowed >= 1")
        if not is_setting(chat_template):
            raise ValueError(allowed("chat_template", chat_template))
        check_fit(fit)
        self.fit = fit
        self.tasks, self.lengths, self.samples = list(tasks) if tasks else None, [int(x) for x in lengths], samples
        self.batch_size, self.seed, self.chat_template, self.data_dir = batch_size, seed, chat_template, data_dir

    def __call__(self, model, tokenizer, out_dir, logger=None, **_) -> dict:
        from lctw.eval.ruler import results_table, run_ruler, write_results

        results = run_ruler(model, tokenizer, self.tasks, self.lengths, self.samples, batch_size=self.batch_size,
                            seed=self.seed, chat_template=self.chat_template, data_dir=self.data_dir, fit=self.fit)
        out = Path(out_dir)
        print(write_results(results, out))
        table = results_table(results)
        plots = save_ruler_plots(table, out)
        metrics = {f"eval/ruler/{task}/{length}": float(score)
                   for task, by_len in results["scores"].items() for length, score in by_len.items()}
        metrics.update({f"eval/ruler/average/{length}": float(v) for length, v in results["average"].items()})
        log_results(logger, metrics, table, "eval/ruler", plots)
        return metrics


class Harness:
    """MMLU / BBH / LongBench on local data (``lctw.eval.harness``), each in its official profile by default.

    ``mmlu``, ``bbh`` and ``longbench`` hold each benchmark's settings (``conf/eval/harness.yaml``); what
    is left out keeps the official default: 5-shot MMLU, 3-shot BBH, LongBench's model2maxlen budget.
    """

    OPTIONS = {"mmlu": {"num_fewshot"}, "bbh": {"num_fewshot"}, "longbench": {"max_length", "chat_template"}}

    def __init__(self, tasks: list[str], data_dir: str, limit: float | None = None, batch_size: int = 1,
                 chat_template: bool = False, mmlu: dict | None = None, bbh: dict | None = None,
                 longbench: dict | None = None):
        from lctw.eval.harness.tasks import BBH_FEWSHOT, MMLU_FEWSHOT

        if not tasks:
            raise ValueError("tasks is empty: give e.g. [mmlu, bbh, longbench] or single tasks (mmlu_<subject>)")
        if not data_dir:
            raise ValueError("data_dir is required: the directory holding your local mmlu/ bbh/ longbench/ data")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is out of range: allowed >= 1")
        parts = {"mmlu": dict(mmlu or {}), "bbh": dict(bbh or {}), "longbench": dict(longbench or {})}
        for name, options in parts.items():
            unknown = sorted(set(options) - self.OPTIONS[name])
            if unknown:
                raise ValueError(f"{name}: unknown options {unknown}; allowed {sorted(self.OPTIONS[name])}")
        self.mmlu_fewshot = int(parts["mmlu"].get("num_fewshot", MMLU_FEWSHOT))
        self.bbh_fewshot = int(parts["bbh"].get("num_fewshot", BBH_FEWSHOT))
        if self.mmlu_fewshot < 0:
            raise ValueError(f"mmlu: num_fewshot={self.mmlu_fewshot} is out of range: allowed >= 0 (standard: 5)")
        if not 0 <= self.bbh_fewshot <= BBH_FEWSHOT:
            raise ValueError(f"bbh: num_fewshot={self.bbh_fewshot} is out of range: allowed 0-{BBH_FEWSHOT} (the "
                             f"official BBH prompt files hold {BBH_FEWSHOT} exemplars per task; 3 = lm-eval's "
                             "bbh_fewshot, 0 = bbh_zeroshot)")
        self.lb_max = parts["longbench"].get("max_length")
        if self.lb_max is not None and int(self.lb_max) < 2:
            raise ValueError(f"longbench: max_length={self.lb_max} is out of range: allowed >= 2 or null")
        self.lb_chat = parts["longbench"].get("chat_template", "auto")
        if not is_setting(self.lb_chat):
            raise ValueError(f"longbench: {allowed('chat_template', self.lb_chat)}")
        self.tasks, self.data_dir, self.limit = list(tasks), data_dir, limit
        self.batch_size, self.chat_template = batch_size, chat_template

    def __call__(self, model, tokenizer, out_dir, logger=None, **_) -> dict:
        from lctw.eval.harness import results_table, run_harness, write_harness_results

        results = run_harness(model, tokenizer, self.tasks, self.data_dir, mmlu_fewshot=self.mmlu_fewshot,
                              bbh_fewshot=self.bbh_fewshot, limit=self.limit, batch_size=self.batch_size,
                              chat_template=self.chat_template, longbench_max_length=self.lb_max,
                              longbench_chat_template=self.lb_chat)
        print(write_harness_results(results, out_dir))
        metrics = {f"eval/harness/{task}": float(r["score"]) for task, r in results["results"].items()}
        metrics.update({f"eval/harness/{group}": float(g["score"]) for group, g in results["groups"].items()})
        metrics.update({f"eval/harness/{group}/{category}": float(v) for group, g in results["groups"].items()
                        for category, v in g.get("categories", {}).items()})
        log_results(logger, metrics, results_table(results).set_index("task"), "eval/harness")
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
