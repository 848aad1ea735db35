"""``generate_samples``: a RULER dataset for one task, length and tokenizer, every sample fitted to the budget.

The fitting is the same for every task kind, so it lives here and the generators only say how haystack
units become text. Two ways to fit (``fit``):

* ``exact`` (default): one haystack size per task and length, searched on a probe that sees sample 0's
  random draws to within 0.1% of the budget; a sample that does not fit at that size is rebuilt from its
  own draws with as many fewer units as its excess needs. Prompts fill the budget to a few tokens.
* ``reference`` (what published numbers used): NVIDIA/RULER's own procedure. The size grows by a
  fixed step (``_Generator.step``: 500 essay words, 25 noise/needle lines (5 below 4k), 10 list words,
  variable-tracking noise lines or QA documents, length/32 for FWE) from one step until a probe (prompt
  plus answers) overflows, and is then taken one step back; each probe uses up random draws, as there.
  A sample that still overflows is drawn anew with one step fewer. Prompts come out shorter, by up to a
  step (e.g. qa_1 at 4k: 3-15%), and below about 4k tokens a step is too coarse for the essay and QA
  tasks (500 words, 10 documents), which then report that they do not fit: the reason ``exact`` is the
  default for the short lengths this project's runs use.

Two upstream versions (issue 19): NVIDIA/RULER replaced its fixed-step search by a binary search for the
haystack size in June 2025 (niah, qa, vt and cwe). ``reference`` reproduces the 2024 generator, the one
behind the RULER paper and its public leaderboard; current upstream picks the largest haystack that
fits, as ``exact`` does (by binary search there, by interpolation to within 0.1% here). ``FIT_UPSTREAM``
says which, and the runner records it with the results (``config.fit_upstream``).

Each (task, length) draws from its own ``random.Random`` seeded by ``sample_seed`` (the run's seed, the
task and the length): the reference runs one process per task and length, whose draws differ because its
size search uses up a length-dependent number of them; a derived seed decorrelates the samples of
different tasks and lengths in both fitting modes.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from lctw.eval.ruler.generators import make_generator
from lctw.eval.ruler.prompts import Prompter, clone_rng, search_units
from lctw.eval.ruler.tasks import TASKS
from lctw.eval.ruler_sources import RulerError

# Which NVIDIA/RULER generator a fit sizes haystacks like, recorded with every result (config.fit_upstream).
FIT_UPSTREAM = {
    "exact": "NVIDIA/RULER since June 2025 (binary haystack search for niah, qa, vt and cwe): the largest haystack "
             "that fits; not the sizing of the RULER paper or its leaderboard (use fit=reference for those)",
    "reference": "NVIDIA/RULER before June 2025 (fixed-step haystack search): the sizing of the RULER paper's "
                 "tables and its public leaderboard; compare with those",
}
FITS = tuple(FIT_UPSTREAM)


def check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not allowed: choose one of {list(FITS)}")


def sample_seed(seed: int, task: str, length: int) -> int:
    """The seed of one task's stream at one length, the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}/{length}".encode()).digest()[:8], "big")


def generate_samples(
    task: str,
    tokenizer,
    length: int,
    num_samples: int,
    seed: int = 42,
    chat_template: bool | str = False,
    data_dir: str | Path | None = None,
    fit: str = "exact",
) -> list[dict]:
    """Generate ``num_samples`` RULER samples of ``task`` sized for ``length`` tokens of ``tokenizer``.

    ``chat_template`` is the wrapper: ``True`` (or ``"tokenizer"``) the tokenizer's chat template,
    ``False`` none (RULER's ``base``), or the name of one of RULER's templates
    (``lctw.eval.ruler.templates``). Each sample has ``input`` (the full prompt: wrapper, instruction,
    context, question and answer prefix), ``outputs`` (reference strings), ``length`` (tokens of
    ``input`` as ``encode_prompt`` counts them, with the sample's ``add_special_tokens``), ``template``,
    ``max_new_tokens`` and ``answer_prefix``; a sample's ``length + max_new_tokens`` never exceeds the
    ``length`` asked for. ``fit`` is ``exact`` or ``reference`` (see the module). Raises
    ``MissingDataError`` if a data source is not installed and
    ``RulerError`` if the length is too short for the task.
    """
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; choose from {sorted(TASKS)}")
    check_fit(fit)
    spec = TASKS[task]
    prompter = Prompter(tokenizer, chat_template)
    rng = random.Random(sample_seed(seed, task, length))
    gen = make_generator(spec, length, seed, data_dir)
    gen.prepare(prompter, rng)
    fitter = _fit_exact if fit == "exact" else _fit_reference
    samples = []
    for index, (draft, text, tokens, n) in enumerate(fitter(gen, prompter, rng, spec, length, task, num_samples)):
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
                "add_special_tokens": prompter.add_special_tokens,
                "template": prompter.template,
            }
        )
    return samples


def _fit_exact(gen, prompter, rng, spec, length, task, num_samples):
    budget = length - spec.max_new_tokens

    # One haystack size for the task and length, found on a probe that sees the same random draws
    # as sample 0 (so sample 0 fits exactly).
    def measure(n: int) -> int:
        return prompter.count(prompter.render(gen.build(n, clone_rng(rng), 0)))

    num_units, tokens_per_unit = search_units(measure, budget, gen.min_units_for(0), gen.max_units, task, length)
    gen.check_size(num_units)
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
        yield draft, text, tokens, n


def _fit_reference(gen, prompter, rng, spec, length, task, num_samples):
    step = gen.step()
    n = gen.reference_start(step)
    while True:  # grow by one step until a probe (prompt and answers, as the reference counts) overflows
        draft = gen.build(n, rng, 0)
        total = prompter.count(prompter.render(draft) + " " + " ".join(draft.outputs))
        if total + spec.max_new_tokens > length:
            n -= step
            break
        if gen.max_units is not None and n >= gen.max_units:
            n = gen.max_units
            break
        n += step
    if n < gen.min_units_for(0):
        raise RulerError(f"{task}: no haystack of a {step}-unit step fits in {length} tokens (fit=reference)")
    gen.check_size(n)
    for index in range(num_samples):
        gen.check_index(index)
        used = n
        while True:  # an overflowing sample is drawn anew with one step fewer
            draft = gen.build(used, rng, index)
            text = prompter.render(draft)
            tokens = prompter.count(text)
            if tokens + spec.max_new_tokens <= length:
                break
            used -= step
            if used < gen.min_units_for(index):
                raise RulerError(f"{task}: sample {index} does not fit in {length} tokens (fit=reference)")
        yield draft, text, tokens, used
