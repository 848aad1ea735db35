"""``run_harness``: lm-eval on the generated task configs, then per-task scores, group averages and tables.

The runner owns only what lm-eval does not: which model and chat setting each group of tasks runs with,
how lm-eval's raw results map to the reported scores (0-100, like RULER's; ``<metric>_stderr`` is
lm-eval's bootstrap/analytic standard error on the same scale) and how families are averaged.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from lctw.eval.harness.lmeval import TaskWriter
from lctw.eval.harness.readers import HarnessDataError, expand_tasks
from lctw.eval.harness.tasks import LONGBENCH_TASKS

_LB_METRICS = tuple(dict.fromkeys(t.metric for t in LONGBENCH_TASKS.values()))


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lctw.eval.harness needs EleutherAI's lm-eval: pip install lm-eval") from e
    return lm_eval, HFLM, TaskManager


def _model_max_length(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 1,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    longbench_max_length: int | None = None,
    work_dir: str | None = None,
    log_samples: bool = False,
    seed: int = 1234,
) -> dict:
    """Evaluate an already-loaded causal LM on local MMLU / BBH / LongBench data with lm-eval.

    ``tasks`` takes families (``mmlu``, ``bbh``, ``longbench``: every task found under ``data_dir``) or
    single tasks (``mmlu_<subject>``, ``bbh_<task>``, ``longbench_<task>``). ``num_fewshot`` applies to
    MMLU and BBH (standard: 5 and 3); LongBench prompts carry their own examples. ``limit`` is lm-eval's
    (first n docs per task, or a fraction). ``apply_chat_template`` wraps MMLU/BBH prompts with lm-eval's
    chat rendering and LongBench prompts with the tokenizer's template (except the tasks LongBench runs
    raw). ``max_length`` is lm-eval's context window (default: the model's ``max_position_embeddings``);
    ``longbench_max_length`` is the prompt budget for middle truncation (default: that window minus 500,
    LongBench's convention, e.g. 3500 for a 4k model). ``work_dir`` keeps the generated YAMLs and JSONL
    (default: a temporary directory removed afterwards).

    Returns ``{"results": {task: {"score", <metric>, <metric>_stderr, "n", "family", "metric"}},
    "groups": {family or requested name: {"score", "n", "tasks"}}, "config": {...}}`` and, with
    ``log_samples``, ``"samples": {task: [{"doc", "prediction", ...}]}``. Scores are on 0-100.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise HarnessDataError(f"data_dir {data} does not exist")
    if num_fewshot < 0:
        raise ValueError("num_fewshot must be >= 0")
    window = max_length or _model_max_length(model)
    if longbench_max_length is None and window:
        longbench_max_length = max(window - 500, window // 2)

    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="lctw-harness-")
    work = Path(work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        writer = TaskWriter(data, work, num_fewshot, tokenizer, longbench_max_length, apply_chat_template)
        requested = expand_tasks(data, tasks)
        names: dict[str, tuple[str, str]] = {}  # lm-eval task -> (family, short name)
        for req, subs in requested.items():
            family = req.partition("_")[0]
            for sub in subs:
                names.setdefault(writer.write(family, sub), (family, sub))

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=window)
        manager = TaskManager(include_path=str(work), include_defaults=False)
        # LongBench renders its own chat wrapper (per task), so it runs in a call without lm-eval's.
        groups = [[t for t, (f, _) in names.items() if f != "longbench"],
                  [t for t, (f, _) in names.items() if f == "longbench"]]
        results: dict[str, dict] = {}
        samples: dict[str, list] = {}
        for group, chat in zip(groups, (apply_chat_template, False), strict=True):
            if not group:
                continue
            out = lm_eval.simple_evaluate(
                model=lm, tasks=group, task_manager=manager, limit=limit, log_samples=log_samples,
                apply_chat_template=chat, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
            if out is None:  # non-zero ranks under torch.distributed
                continue
            for task in group:
                family, short = names[task]
                results[f"{family}_{short}"] = _task_metrics(out, task, family)
                if log_samples:
                    samples[f"{family}_{short}"] = [_sample(s, family) for s in out["samples"].get(task, [])]
    finally:
        if tmp is not None:
            tmp.cleanup()

    report: dict[str, Any] = {
        "results": results,
        "groups": {req: _group(req, [f"{req.partition('_')[0]}_{s}" for s in subs], results)
                   for req, subs in requested.items() if len(subs) > 1 or "_" not in req},
        "config": dict(tasks=list(tasks), data_dir=str(data), num_fewshot=num_fewshot, limit=limit,
                       batch_size=batch_size, apply_chat_template=apply_chat_template, max_length=window,
                       longbench_max_length=longbench_max_length, seed=seed,
                       lm_eval_version=getattr(lm_eval, "__version__", "unknown")),
    }
    if log_samples:
        report["samples"] = samples
    return report


def _sample(s: dict, family: str) -> dict:
    """One logged sample: the prompt exactly as the model saw it (before tokenisation), the prediction
    (the generation, or for MMLU the log-likelihood of each letter) and the per-sample metric."""
    args = s["arguments"][0]
    if family == "mmlu":
        prediction = [float(ll) for ll, _ in s["filtered_resps"]]
    else:
        prediction = s["filtered_resps"][0]
    metrics = {k: float(v) for k, v in s.items() if k in ("acc", "exact_match", *_LB_METRICS)}
    return {"doc": s["doc"], "prompt": args[0], "prediction": prediction, **metrics}


def _task_metrics(out: dict, task: str, family: str) -> dict:
    raw = out["results"][task]
    metric = {"mmlu": "acc", "bbh": "exact_match"}.get(family)
    if metric is None:
        metric = next(m for m in _LB_METRICS if f"{m},none" in raw)
    value = float(raw[f"{metric},none"]) * 100
    stderr = raw.get(f"{metric}_stderr,none")
    stderr = float(stderr) * 100 if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    return {"family": family, "metric": metric, "score": value, metric: value, f"{metric}_stderr": stderr,
            "n": int(n) if n is not None else None}


def _group(name: str, members: list[str], results: dict) -> dict:
    """MMLU: micro average over all questions; BBH and LongBench: mean over tasks."""
    rows = [results[m] for m in members if m in results]
    if name.startswith("mmlu"):
        total = sum(r["n"] for r in rows)
        score = sum(r["score"] * r["n"] for r in rows) / total if total else float("nan")
    else:
        score = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    return {"score": score, "n": sum(r["n"] or 0 for r in rows), "tasks": len(rows)}


def results_table(report: dict):
    """A pandas DataFrame: one row per task, then one per group (task column ``<group> (avg)``)."""
    import pandas as pd

    rows = [{"task": t, "family": r["family"], "metric": r["metric"], "score": r["score"],
             "stderr": r.get(f"{r['metric']}_stderr"), "n": r["n"]} for t, r in report["results"].items()]
    rows += [{"task": f"{g} (avg)", "family": g.partition("_")[0], "metric": "micro" if g.startswith("mmlu")
              else "mean", "score": v["score"], "stderr": None, "n": v["n"]} for g, v in report["groups"].items()]
    return pd.DataFrame(rows, columns=["task", "family", "metric", "score", "stderr", "n"])


def write_harness_results(results: dict, out_dir: str) -> str:
    """Write ``harness.csv`` (the table) and ``harness.json`` (everything) to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "harness.csv", index=False)
    (out / "harness.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return table.to_string(index=False, float_format=lambda x: f"{x:.2f}", na_rep="-")
