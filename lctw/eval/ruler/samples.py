"""``generate_samples``: a RULER dataset for one task, length and tokenizer, every sample fitted to the budget.

The fitting is the same for every task kind, so it lives here and the generators only say how haystack
units become text: one haystack size per task and length, searched on a probe that sees sample 0's
random draws; a sample that does not fit at that size is rebuilt from its own draws with fewer units
(how this departs from the reference is in ``lctw.eval.ruler``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from lctw.eval.ruler.generators import make_generator
from lctw.eval.ruler.prompts import Prompter, clone_rng, search_units
from lctw.eval.ruler.tasks import TASKS
from lctw.eval.ruler_sources import RulerError


def generate_samples(
    task: str,
    tokenizer,
    length: int,
    num_samples: int,
    seed: int = 42,
    chat_template: bool = False,
    data_dir: str | Path | None = None,
) -> list[dict]:
    """Generate ``num_samples`` RULER samples of ``task`` sized for ``length`` tokens of ``tokenizer``.

    Each sample has ``input`` (the full prompt: chat wrapper if ``chat_template``, instruction, context,
    question and answer prefix), ``outputs`` (reference strings), ``length`` (tokens of ``input`` as
    ``encode_prompt`` counts them), ``max_new_tokens`` and ``answer_prefix``; a sample's
    ``length + max_new_tokens`` never exceeds the ``length`` asked for. Raises ``MissingDataError`` if a
    data source is not installed and ``RulerError`` if the length is too short for the task.
    """
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    prompter = Prompter(tokenizer, chat_template)
    budget = length - spec.max_new_tokens
    rng = random.Random(seed)
    gen = make_generator(spec, length, seed, data_dir)
    gen.prepare(prompter, rng)

    # One haystack size for the task and length, found on a probe that sees the same random draws
    # as sample 0 (so sample 0 fits exactly).
    def measure(n: int) -> int:
        return prompter.count(prompter.render(gen.build(n, clone_rng(rng), 0)))

    num_units, tokens_per_unit = search_units(
        measure, budget, gen.min_units_for(0), gen.max_units, task, length
    )
    gen.check_size(num_units)

    samples = []
    for index in range(num_samples):
        gen.check_index(index)
        # A sample too long at num_units is rebuilt from the same random draws with fewer units, so it
        # shrinks to fit instead of being replaced by a different, luckier sample.
        n, start_state = num_units, rng.getstate()
        while True:
            rng.setstate(start_state)
            draft = gen.build(n, rng, index)
            text = prompter.render(draft)
            tokens = prompter.count(text)
            excess = tokens + spec.max_new_tokens - length
            if excess <= 0:
                break
            n -= max(1, math.ceil(excess / max(tokens_per_unit, 1e-6)))
            if n < gen.min_units_for(index):
                raise RulerError(f"{task}: sample {index} does not fit in {length} tokens")
        samples.append(
            {
                "index": index,
                "task": task,
                "input": text,
                "outputs": list(draft.outputs),
                "length": tokens,
                "max_new_tokens": spec.max_new_tokens,
                "answer_prefix": draft.answer_prefix,
                "target_length": length,
                "num_units": n,
                "add_special_tokens": not chat_template,
            }
        )
    return samples
