"""``run_ruler``: generate RULER data, decode greedily, score with the reference metrics, write the tables.

Generation and scoring are fixed by the benchmark; the runner only batches left-padded prompts encoded
exactly as the length budget counted them (``encode_prompt``), decodes only the new tokens, and records
a task that cannot be generated (e.g. data not installed) as an error so that the others still run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lctw.eval.generate import left_padded
from lctw.eval.metrics import METRICS, postprocess_pred
from lctw.eval.ruler.prompts import encode_prompt
from lctw.eval.ruler.samples import FIT_UPSTREAM, check_fit, generate_samples
from lctw.eval.ruler.tasks import TASKS
from lctw.eval.ruler.templates import RULER
from lctw.eval.ruler_sources import RulerError
from lctw.eval.templates import model_name


def _generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    from transformers import GenerationConfig

    input_ids, attention_mask, pad_id = left_padded(prompts, tokenizer, next(model.parameters()).device)
    width = input_ids.shape[1]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        use_cache=True,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def run_ruler(
    model,
    tokenizer,
    tasks: Iterable[str] | None,
    lengths: Iterable[int],
    num_samples: int,
    batch_size: int = 8,
    seed: int = 42,
    chat_template: bool | str = "auto",
    progress: bool = True,
    data_dir: str | Path | None = None,
    fit: str = "exact",
) -> dict:
    """Generate RULER data, decode greedily with the KV cache, and score every task x length.

    ``chat_template``: ``auto`` takes RULER's own template for a model RULER names (Llama 2 / 3, chat or
    base, by the model's or the tokenizer's name), else the tokenizer's chat template when it has one;
    ``True`` (or ``tokenizer``) requires the tokenizer's, ``False`` sends plain prompts, and ``base`` /
    ``meta-chat`` / ``meta-llama3`` choose one of RULER's (``lctw.eval.ruler.templates``). The template that ran is
    printed and recorded in ``config`` (``template``, ``template_reason``, ``prompt_format``,
    ``chat_template``: whether prompts were wrapped). ``fit`` is how haystacks are sized
    (``generate_samples``: ``exact`` or the reference's ``reference``); ``config.fit_upstream`` says
    which NVIDIA/RULER generator that matches, so which published tables a score stands next to.

    Returns a dict with ``scores`` {task: {length: score}}, ``average`` {length: mean over the tasks
    that ran at that length}, ``errors`` {task: {length: message}} for tasks that could not be generated
    (e.g. data not installed), ``nulls`` (empty predictions), ``predictions`` {task: {length: [...]}} and
    ``config``. A RULER score is comparable with published ones only when all 13 tasks ran.
    """
    import torch
    from tqdm.auto import tqdm

    tasks = list(TASKS) if tasks is None else list(tasks)
    lengths = [int(x) for x in lengths]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown RULER tasks {unknown}")
    check_fit(fit)
    template, reason = RULER.resolve(chat_template, tokenizer, model_name(model))
    prompt_format = RULER.describe(template)
    print(f"RULER prompt format: {prompt_format} (chat_template={chat_template}: {reason}); "
          f"haystack fit: {fit}, as {FIT_UPSTREAM[fit]}")
    results: dict[str, Any] = {
        "scores": {},
        "average": {},
        "errors": {},
        "nulls": {},
        "predictions": {},
        "config": dict(
            tasks=tasks,
            lengths=lengths,
            num_samples=num_samples,
            seed=seed,
            chat_template=template != "base",
            chat_template_setting=chat_template,
            template=template,
            template_reason=reason,
            prompt_format=prompt_format,
            fit=fit,
            fit_upstream=FIT_UPSTREAM[fit],
            batch_size=batch_size,
        ),
    }
    bar = tqdm(
        total=len(tasks) * len(lengths) * num_samples, desc="RULER", unit="sample", disable=not progress
    )
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            for task in tasks:
                bar.set_postfix_str(f"{task}@{length}")
                try:
                    samples = generate_samples(
                        task,
                        tokenizer,
                        length,
                        num_samples,
                        seed=seed,
                        chat_template=template,
                        data_dir=data_dir,
                        fit=fit,
                    )
                except RulerError as err:
                    results["errors"].setdefault(task, {})[length] = f"{type(err).__name__}: {err}"
                    bar.update(num_samples)
                    continue
                spec = TASKS[task]
                preds = []
                for start in range(0, len(samples), batch_size):
                    batch = samples[start : start + batch_size]
                    ids = [encode_prompt(tokenizer, s["input"], s["add_special_tokens"]) for s in batch]
                    with torch.inference_mode():
                        preds += _generate_batch(model, tokenizer, ids, spec.max_new_tokens)
                    bar.update(len(batch))
                preds = [postprocess_pred(p) for p in preds]
                refs = [s["outputs"] for s in samples]
                results["scores"].setdefault(task, {})[length] = METRICS[spec.metric](preds, refs)
                results["nulls"].setdefault(task, {})[length] = sum(not p for p in preds)
                results["predictions"].setdefault(task, {})[length] = [
                    {"index": s["index"], "pred": p, "outputs": s["outputs"], "length": s["length"]}
                    for s, p in zip(samples, preds, strict=True)
                ]
    finally:
        bar.close()
        model.train(was_training)
    for length in lengths:
        ran = [results["scores"][t][length] for t in tasks if length in results["scores"].get(t, {})]
        if ran:
            results["average"][length] = sum(ran) / len(ran)
    return results


def results_table(results: dict):
    """Scores as a pandas DataFrame: one row per task plus ``average``, one column per length."""
    import pandas as pd

    lengths = results["config"]["lengths"]
    rows = {
        task: [results["scores"].get(task, {}).get(length, float("nan")) for length in lengths]
        for task in results["config"]["tasks"]
    }
    rows["average"] = [results["average"].get(length, float("nan")) for length in lengths]
    return pd.DataFrame.from_dict(rows, orient="index", columns=lengths)


def write_results(results: dict, out_dir: str | Path) -> str:
    """Write ``ruler_scores.csv`` and ``ruler_results.json`` (with predictions) to ``out_dir``.

    Returns the score table as printable text (missing task x length cells, e.g. data not installed,
    show as NaN and are listed below the table).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "ruler_scores.csv", index_label="task")
    with open(out / "ruler_results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    text = table.to_string(float_format=lambda x: f"{x:.2f}")
    for task, by_length in results["errors"].items():
        for length, message in by_length.items():
            text += f"\n{task}@{length}: {message}"
    return text
