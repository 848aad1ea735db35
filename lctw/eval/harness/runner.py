"""``run_harness``: MMLU / BBH through lm-eval, LongBench as its reference runs it, then scores and averages.

The runner owns only what the benchmarks' own code does not: which runner each family goes to, how
lm-eval's raw results map to the reported scores (0-100, like RULER's; ``<metric>_stderr`` is the
standard error of the mean on the same scale) and how families are averaged (``_group``).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from lctw.eval.harness.lmeval import TaskWriter
from lctw.eval.harness.longbench import run_longbench_task
from lctw.eval.harness.readers import HarnessDataError, expand_tasks, read_longbench
from lctw.eval.harness.tasks import (
    BBH_FEWSHOT,
    LONGBENCH_CATEGORIES,
    LONGBENCH_TASKS,
    LONGBENCH_TEMPLATES,
    MMLU_FEWSHOT,
    longbench_budget,
    longbench_category,
)
from lctw.eval.templates import BASE, TOKENIZER, Setting, model_name


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lctw.eval.harness needs EleutherAI's lm-eval for MMLU and BBH: pip install lm-eval") from e
    return lm_eval, HFLM, TaskManager


def _model_max_length(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def resolve_longbench_template(setting: bool | str, tokenizer, model=None) -> tuple[str, str]:
    """(template, why) for ``longbench_chat_template`` (``lctw.eval.templates.Reference.resolve``):
    ``auto`` takes LongBench's string for a model it names (Llama 2 chat), plain text for a base Llama,
    Llama 3's chat format without a system block for an instruct Llama 3 (LongBench v1 names none), and
    for other models the tokenizer's chat template when it has one. The model is recognised by its
    config's ``_name_or_path``, then by the tokenizer's ``name_or_path``."""
    return LONGBENCH_TEMPLATES.resolve(setting, tokenizer, model_name(model))


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str,
    mmlu_fewshot: int = MMLU_FEWSHOT,
    bbh_fewshot: int = BBH_FEWSHOT,
    limit: int | float | None = None,
    batch_size: int = 1,
    chat_template: bool = False,
    max_length: int | None = None,
    longbench_max_length: int | None = None,
    longbench_chat_template: Setting = "auto",
    work_dir: str | None = None,
    log_samples: bool = False,
    seed: int = 1234,
) -> dict:
    """Evaluate an already-loaded causal LM on local MMLU / BBH / LongBench data.

    ``tasks`` takes families (``mmlu``, ``bbh``, ``longbench``, ``longbench_e``: every task found under
    ``data_dir``) or single tasks (``mmlu_<subject>``, ``bbh_<task>``, ``longbench_<task>``). The defaults
    are the official profiles (``lctw.eval.harness.tasks``): 5-shot MMLU, 3-shot BBH (``bbh_fewshot=0``
    is lm-eval's ``bbh_zeroshot``), LongBench with its own prompts. ``limit`` is lm-eval's (first n docs
    per task, or a fraction), applied to LongBench alike. ``chat_template`` is lm-eval's
    ``apply_chat_template`` for MMLU / BBH (off in lm-eval's standard runs). ``max_length`` is lm-eval's
    context window (default: the model's ``max_position_embeddings``). ``longbench_max_length`` is
    LongBench's prompt budget for middle truncation (default: ``longbench_budget`` of that window, as
    ``model2maxlen.json``: 3500 for a 4096-position model); ``longbench_chat_template`` is the wrapper of
    LongBench's chat tasks (``resolve_longbench_template``): ``auto``, ``true`` / ``tokenizer`` (the
    tokenizer's chat template), ``false`` / ``base`` (none), ``meta-chat`` (``build_chat``'s Llama 2
    string) or ``meta-llama3``; trec, triviaqa, samsum, lcc and repobench-p are never wrapped, as in
    ``pred.py``. The template that ran is printed and recorded in ``config`` (``longbench_template``,
    ``longbench_template_reason``, ``longbench_prompt_format``) and in each LongBench result (``template``).
    ``work_dir`` keeps the generated YAMLs and JSONL (default: a temporary directory removed afterwards).

    Returns ``{"results": {task: {"score", <metric>, <metric>_stderr, "n", "family", "metric"}},
    "groups": {family or requested name: {"score", "n", "tasks", ...}}, "config": {...}}`` and, with
    ``log_samples``, ``"samples": {task: [{"doc", "prompt", "prediction", ...}]}``. Scores are on 0-100.
    """
    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise HarnessDataError(f"data_dir {data} does not exist")
    if mmlu_fewshot < 0 or bbh_fewshot < 0:
        raise ValueError("mmlu_fewshot and bbh_fewshot must be >= 0")
    window = max_length or _model_max_length(model)
    requested = expand_tasks(data, tasks)
    names: dict[str, tuple[str, str]] = {}  # runner task name -> (family, short name)
    lb_tasks = {}
    lm_families = any(req.partition("_")[0] != "longbench" for req in requested)
    lm_eval = None
    if lm_families:
        lm_eval, HFLM, TaskManager = _import_lm_eval()
    lb_template, lb_reason = resolve_longbench_template(longbench_chat_template, tokenizer, model)
    lb_format = LONGBENCH_TEMPLATES.describe(lb_template)
    if any(req.startswith("longbench") for req in requested):
        if lb_template == TOKENIZER and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"longbench.chat_template={longbench_chat_template!r} asks for the tokenizer's chat "
                             "template, but the tokenizer has none: choose false, base, meta-chat or meta-llama3")
        if longbench_max_length is None:
            if not window:
                raise ValueError("LongBench needs longbench_max_length: the model config has no "
                                 "max_position_embeddings")
            longbench_max_length = longbench_budget(window)
        plain = ", ".join(name for name, spec in LONGBENCH_TASKS.items() if not spec.chat)
        print(f"LongBench prompt format: {lb_format} (longbench.chat_template={longbench_chat_template}: "
              f"{lb_reason}); never wrapped, as in pred.py: {plain}")

    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="lctw-harness-")
    work = Path(work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    try:
        writer = TaskWriter(data, work, mmlu_fewshot, bbh_fewshot) if lm_families else None
        for req, subs in requested.items():
            family = req.partition("_")[0]
            for sub in subs:
                if family == "longbench":
                    lb_tasks.setdefault(sub, read_longbench(data, sub))
                else:
                    names.setdefault(writer.write(family, sub), (family, sub))
        if names:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=window)
            manager = TaskManager(include_path=str(work), include_defaults=False)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=log_samples,
                apply_chat_template=chat_template, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
            for task, (family, short) in names.items():
                if out is None:  # non-zero ranks under torch.distributed
                    break
                results[f"{family}_{short}"] = _task_metrics(out, task, family)
                if log_samples:
                    samples[f"{family}_{short}"] = [_sample(s, family) for s in out["samples"].get(task, [])]
    finally:
        if tmp is not None:
            tmp.cleanup()
    was_training = model.training
    model.eval()
    try:
        for sub, rows in lb_tasks.items():
            rows = _limit(rows, limit)
            results[f"longbench_{sub}"], logged = run_longbench_task(model, tokenizer, sub, rows,
                                                                     longbench_max_length, lb_template, batch_size)
            if log_samples:
                samples[f"longbench_{sub}"] = logged
    finally:
        model.train(was_training)

    report: dict[str, Any] = {
        "results": results,
        "groups": {req: _group(req, [f"{req.partition('_')[0]}_{s}" for s in subs], results)
                   for req, subs in requested.items() if len(subs) > 1 or "_" not in req or req == "longbench_e"},
        "config": dict(tasks=list(tasks), data_dir=str(data), mmlu_fewshot=mmlu_fewshot, bbh_fewshot=bbh_fewshot,
                       bbh_profile="bbh_fewshot" if bbh_fewshot else "bbh_zeroshot", limit=limit,
                       batch_size=batch_size, chat_template=chat_template, max_length=window,
                       longbench_max_length=longbench_max_length, longbench_chat_template=lb_template != BASE,
                       longbench_chat_template_setting=longbench_chat_template, longbench_template=lb_template,
                       longbench_template_reason=lb_reason, longbench_prompt_format=lb_format, seed=seed,
                       lm_eval_version=getattr(lm_eval, "__version__", None)),
    }
    if log_samples:
        report["samples"] = samples
    return report


def _limit(rows: list, limit: int | float | None) -> list:
    """lm-eval's ``limit``: the first n rows, or the first ceil(fraction * len) of them."""
    if limit is None:
        return rows
    return rows[: int(math.ceil(len(rows) * limit)) if limit < 1.0 else int(limit)]


def _sample(s: dict, family: str) -> dict:
    """One logged sample: the prompt exactly as the model saw it (before tokenisation), the prediction
    (the generation after lm-eval's filter ``filter``, or for MMLU the log-likelihood of each letter), the
    raw generation and the per-sample metric."""
    args = s["arguments"][0]
    if family == "mmlu":
        prediction, raw = [float(ll) for ll, _ in s["filtered_resps"]], None
    else:
        prediction, raw = s["filtered_resps"][0], s["resps"][0][0]
    metrics = {k: float(v) for k, v in s.items() if k in ("acc", "exact_match")}
    return {"doc": s["doc"], "prompt": args[0], "prediction": prediction, "generation": raw,
            "filter": s.get("filter", "none"), **metrics}


def _task_metrics(out: dict, task: str, family: str) -> dict:
    """One MMLU / BBH task's scores from lm-eval's results; zero-shot BBH is scored on its answer filter."""
    raw = out["results"][task]
    metric = "acc" if family == "mmlu" else "exact_match"
    key = f"{metric},flexible-extract" if f"{metric},flexible-extract" in raw else f"{metric},none"
    value = float(raw[key]) * 100
    stderr = raw.get(key.replace(",", "_stderr,"))
    stderr = float(stderr) * 100 if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    row = {"family": family, "metric": metric, "score": value, metric: value, f"{metric}_stderr": stderr,
           "n": int(n) if n is not None else None}
    if f"{metric},strict-match" in raw:
        row[f"{metric}_strict"] = float(raw[f"{metric},strict-match"]) * 100
    return row


def _group(name: str, members: list[str], results: dict) -> dict:
    """MMLU and BBH: the mean over all items (lm-eval's groups weight by task size); LongBench (and -E):
    the mean of its category means, as the LongBench README's "Avg"."""
    rows = {m: results[m] for m in members if m in results}
    n = sum(r["n"] or 0 for r in rows.values())
    if not name.startswith("longbench"):
        score = sum(r["score"] * r["n"] for r in rows.values()) / n if n else float("nan")
        return {"score": score, "n": n, "tasks": len(rows), "average": "weighted by task size"}
    categories = longbench_average({m.partition("_")[2]: r["score"] for m, r in rows.items()})
    return {"score": categories.pop("average"), "n": n, "tasks": len(rows), "categories": categories,
            "average": "mean of the category means"}


def longbench_average(scores: dict[str, float]) -> dict[str, float]:
    """{category: mean of its tasks' scores, "average": mean of those category means} for the tasks given.

    A category without any of its tasks is left out, so a partial run averages what it has.
    """
    by_cat: dict[str, list[float]] = {}
    for task, score in scores.items():
        by_cat.setdefault(longbench_category(task), []).append(score)
    out = {c: sum(v) / len(v) for c in LONGBENCH_CATEGORIES if (v := by_cat.get(c))}
    out["average"] = sum(out.values()) / len(out) if out else float("nan")
    return out


def results_table(report: dict):
    """A pandas DataFrame: one row per task, then one per group (task column ``<group> (avg)``)."""
    import pandas as pd

    rows = [{"task": t, "family": r["family"], "metric": r["metric"], "score": r["score"],
             "stderr": r.get(f"{r['metric']}_stderr"), "n": r["n"]} for t, r in report["results"].items()]
    rows += [{"task": f"{g} (avg)", "family": g.partition("_")[0], "metric": "categories" if g.startswith("longbench")
              else "micro", "score": v["score"], "stderr": None, "n": v["n"]} for g, v in report["groups"].items()]
    return pd.DataFrame(rows, columns=["task", "family", "metric", "score", "stderr", "n"])


def write_harness_results(results: dict, out_dir: str) -> str:
    """Write ``harness.csv`` (the table) and ``harness.json`` (everything) to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "harness.csv", index=False)
    (out / "harness.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return table.to_string(index=False, float_format=lambda x: f"{x:.2f}", na_rep="-")
