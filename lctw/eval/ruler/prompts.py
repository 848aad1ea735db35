"""Prompts as the evaluated model will see them, and the search that fits a haystack to the token budget.

Why one place: the length budget counts the whole rendered prompt (chat wrapper if any, BOS,
instruction, context, answer prefix) plus the task's tokens to generate, so rendering, counting and
the size search must agree on every token; the runner encodes prompts with the same ``encode_prompt``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from lctw.eval.ruler.templates import RULER
from lctw.eval.ruler_sources import RulerError
from lctw.eval.templates import TOKENIZER


@dataclass
class Draft:
    """One candidate sample before it is wrapped for the model."""

    user: str  # instruction + context + question
    answer_prefix: str
    outputs: list[str]
    shots: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) worked examples


def encode_prompt(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of a generated ``input`` exactly as the length budget counted them.

    ``add_special_tokens`` is the sample's own field: plain prompts get the tokenizer's BOS added;
    prompts rendered with a template that writes BOS as text (the tokenizer's chat template, RULER's
    ``meta-llama3``) get nothing added (the convention of ``apply_chat_template(tokenize=True)``).
    """
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


class Prompter:
    """Renders a ``Draft`` for the evaluated model with one template (``lctw.eval.ruler.templates``) and
    counts its tokens."""

    def __init__(self, tokenizer, template: str):
        template = RULER.template_of(template)
        RULER.check_chat(template, tokenizer)
        self.tokenizer = tokenizer
        self.template = template
        # BOS exactly once: added by the tokenizer unless the wrapper writes it as text
        self.add_special_tokens = not RULER.writes_bos(template, tokenizer)

    def render(self, draft: Draft) -> str:
        if self.template != TOKENIZER:
            # As the reference: the worked examples are whole wrapped prompts with their answers, one per
            # line, before the wrapped prompt (with the base template: plain text).
            shots = "".join(f"{RULER.wrap(self.template, user)}{reply}\n" for user, reply in draft.shots)
            return shots + RULER.wrap(self.template, draft.user) + draft.answer_prefix
        messages = []
        for user, reply in draft.shots:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": draft.user})
        wrapped = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The answer prefix starts the assistant's turn, as with the reference's model templates.
        return wrapped + draft.answer_prefix

    def count(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text, self.add_special_tokens))


# --- Fitting the haystack to the token budget -------------------------------------------------------


def clone_rng(rng: random.Random) -> random.Random:
    """A generator in ``rng``'s state: a probe sees the draws the real build will make, without using them up."""
    twin = random.Random()
    twin.setstate(rng.getstate())
    return twin


def count_plain(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def search_units(
    measure: Callable[[int], int], budget: int, lo: int, hi: int | None, what: str, length: int
) -> tuple[int, float]:
    """Largest n in [lo, hi] with measure(n) <= budget, for a (nearly) increasing measure.

    Token counts are close to linear in n, so interpolation finds the boundary in a handful of
    tokenizations; bisection takes over when interpolation keeps landing on one side. The search stops
    once the fitting n is within 0.1% of the budget (a few tokens at 4k, ~130 at 128k). Returns n and
    the observed tokens per unit.
    """
    cache: dict[int, int] = {}

    def m(n: int) -> int:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n]

    if m(lo) > budget:
        raise RulerError(
            f"{what}: even the smallest haystack needs {m(lo)} prompt tokens, but a length of "
            f"{length} leaves {budget}"
        )
    tolerance = budget // 1000
    a, b = lo, lo + max(8, lo)
    if hi is not None:
        b = min(b, hi)
    while m(b) <= budget:  # grow until the budget is exceeded, extrapolating linearly
        if b == hi:
            a = b
            break
        slope = max(m(b) - m(a), 1) / (b - a)
        nxt = b + max(1, int((budget - m(b)) / slope * 1.02) + 8)
        a, b = b, nxt if hi is None else min(nxt, hi)
    else:
        same_side, last_side = 0, None
        while b - a > 1 and m(a) < budget - tolerance:
            if same_side >= 2:
                mid = (a + b) // 2
            else:
                mid = a + int((budget + 0.5 - m(a)) * (b - a) / max(m(b) - m(a), 1))
                mid = min(max(mid, a + 1), b - 1)
            fits = m(mid) <= budget
            a, b = (mid, b) if fits else (a, mid)
            same_side = same_side + 1 if fits == last_side else 0
            last_side = fits
    tokens_per_unit = (m(a) - m(lo)) / (a - lo) if a > lo else max(1.0, float(m(lo)))
    return a, tokens_per_unit

