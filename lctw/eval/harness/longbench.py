"""LongBench as THUDM/LongBench's ``pred.py`` runs it: prompts, middle truncation, generation, scoring.

Why not through lm-eval: lm-eval cuts every prompt from the left to ``max_length - max_gen_toks`` (for
gov_report on a 4k model that removes BOS, the instruction and any chat header of every truncated
prompt), adds special tokens per *batch* by looking at the first prompt only (a plain prompt batched
with a chat-wrapped one loses its BOS), and has no hook for samsum's generation rule. Here each prompt
is encoded on its own, exactly as ``pred.py`` does, and nothing cuts it afterwards:

1. the reference prompt is tokenized *with* special tokens (BOS counts against the budget, as there);
   longer than ``max_length`` tokens, it becomes the decoded first ``max_length // 2`` tokens plus the
   decoded last ``max_length // 2`` (special tokens skipped);
2. chat tasks are wrapped in ``build_chat``'s string for the model (``LONGBENCH_TEMPLATES``: Llama 2
   chat ``[INST]...[/INST]``, plain text for a base Llama, and for any other model the tokenizer's chat
   template when it has one; ``lctw.eval.templates``); trec, triviaqa, samsum, lcc and repobench-p never
   are. The tokenizer adds its special tokens (BOS) when the prompt is encoded, as in ``pred.py``, unless
   the wrapper writes BOS as text (the tokenizer's template, Llama 3's header format);
3. greedy decoding of at most the task's new tokens; samsum may not start with EOS or a newline and
   stops at a newline (``min_length`` and ``eos_token_id`` of ``pred.py``);
4. the new tokens decoded without special tokens and scored with the reference metric.

One departure: prompts can be decoded several at a time (``batch_size``), left-padded, which can move a
greedy choice by rounding; ``pred.py`` decodes one at a time (``batch_size=1``, the default).
"""

from __future__ import annotations

import math
from statistics import mean, stdev

from lctw.eval.generate import left_padded
from lctw.eval.harness.metrics import longbench_score
from lctw.eval.harness.tasks import LONGBENCH_E_BUCKETS, LONGBENCH_TASKS, LONGBENCH_TEMPLATES, longbench_base
from lctw.eval.templates import BASE, TOKENIZER


def task_template(task: str, template: str | bool) -> str:
    """The template a task's prompts get: ``template`` for a chat task, ``base`` for the tasks ``pred.py``
    never wraps. ``template`` is a template name (``lctw.eval.templates``), or True (the tokenizer's chat
    template) / False (none)."""
    template = LONGBENCH_TEMPLATES.template_of(template)
    return template if LONGBENCH_TASKS[longbench_base(task)].chat else BASE


def longbench_prompt(tokenizer, task: str, row: dict, max_length: int,
                     template: str | bool) -> tuple[str, list[int]]:
    """The prompt text and token ids the model sees for one LongBench row (``pred.py``'s steps 1-2), with
    ``template`` around a chat task's prompt (``task_template``)."""
    spec = LONGBENCH_TASKS[longbench_base(task)]
    template = task_template(task, template)
    prompt = spec.prompt.format(context=row["context"], input=row["input"])
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) > max_length:
        half = max_length // 2
        prompt = (tokenizer.decode(ids[:half], skip_special_tokens=True)
                  + tokenizer.decode(ids[-half:], skip_special_tokens=True))
    LONGBENCH_TEMPLATES.check_chat(template, tokenizer)
    if template == TOKENIZER:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = LONGBENCH_TEMPLATES.wrap(template, prompt)
    writes_bos = LONGBENCH_TEMPLATES.writes_bos(template, tokenizer)
    return prompt, tokenizer(prompt, add_special_tokens=not writes_bos)["input_ids"]


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_at_newline: bool) -> list[str]:
    import torch

    ids, mask, pad = left_padded(prompts, tokenizer, next(model.parameters()).device)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
    if stop_at_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
        kwargs.update(min_new_tokens=1, eos_token_id=[tokenizer.eos_token_id, newline])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def run_longbench_task(model, tokenizer, task: str, rows: list[dict], max_length: int, template: str | bool,
                       batch_size: int = 1) -> tuple[dict, list[dict]]:
    """Predict and score one task with ``template`` around its chat prompts (``longbench_prompt``); returns
    (its result row, which records the template its prompts got, and its logged samples)."""
    spec = LONGBENCH_TASKS[longbench_base(task)]
    encoded = [longbench_prompt(tokenizer, task, row, max_length, template) for row in rows]
    preds: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = [ids for _, ids in encoded[start:start + batch_size]]
        preds += _generate(model, tokenizer, batch, spec.max_new_tokens, spec.stop_at_newline)
    scores = [longbench_score(task, p, row["answers"], row.get("all_classes")) for p, row in zip(preds, rows,
                                                                                                strict=True)]
    value = 100 * mean(scores)
    stderr = 100 * stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else None
    result = {"family": "longbench", "metric": spec.metric, "score": value, spec.metric: value,
              f"{spec.metric}_stderr": stderr, "n": len(rows), "template": task_template(task, template)}
    if task.endswith("_e"):  # LongBench-E: also by context length in words, as eval.py --e
        result["by_length"] = {}
        for lo, hi, label in LONGBENCH_E_BUCKETS:
            inside = [s for s, row in zip(scores, rows, strict=True)
                      if row.get("length") is not None and lo <= row["length"] and (hi is None or row["length"] < hi)]
            result["by_length"][label] = 100 * mean(inside) if inside else float("nan")
    samples = [{"doc": row, "prompt": prompt, "prompt_tokens": len(ids), "prediction": p, spec.metric: s}
               for row, (prompt, ids), p, s in zip(rows, encoded, preds, scores, strict=True)]
    return result, samples
