"""Planted facts: key–value statements in real prose, restated later (``data.facts``, ``eval=recall``).

Why: in real books long-range dependencies exist but are a small share of the tokens. Planted facts make
that share known and measurable: a statement

    " The secret number of Dovak is 4 7 1 9."

is inserted into a chunk of essay text and restated, word for word, ``d`` tokens later
(``min_distance <= d <= max_distance``, d counted from the first statement's start to the
restatement's start, which is also the distance between the two values). Only the restated value
(its four digit tokens) can be predicted, and only by looking back d tokens.

How a chunk of N tokens is built (:meth:`Facts.plant`): the number of facts is ``rate`` per thousand
tokens of the chunk (the fractional part drawn at random). Each fact draws a key (distinct within the
chunk), a value and a distance uniformly, then the first statement's position uniformly among those that
leave room for the restatement; a placement that overlaps a statement already placed is drawn again
(up to 20 times, then the fact is left out). The essay's tokens fill every position in between, in their
order, so the prose is cut only where a statement is inserted (between two tokens of the text).

Keys are made-up two-syllable names (4,900 of them), values four digits written apart (``"4 7 1 9"``: the
local BPE tokenizer then gives one token per digit, the easiest value vocabulary to copy). A fixed
share ``held_out`` of the keys and of the values (a fixed permutation, the same in every run and every
seed) is kept for the validation split and for ``eval=recall``; the train split never sees them.
"""

from __future__ import annotations

import itertools
import random

from lctw.errors import unknown_option

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
TEMPLATE = " The secret number of {key} is {value}."
SPLITS = ("train", "heldout")


def all_keys() -> list[str]:
    """4,900 made-up names: two consonant-vowel syllables, capitalised (``Dova``, ``Kimu``, ...)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    return [(a + b).capitalize() for a, b in itertools.product(syllables, syllables)]


def all_values() -> list[str]:
    """The 10,000 four-digit values, digits written apart (``"0 3 8 2"``)."""
    return [" ".join(f"{i:04d}") for i in range(10_000)]


def _split(items: list[str], held_out: float, split: str) -> list[str]:
    order = list(items)
    random.Random(1234).shuffle(order)  # fixed: the held-out keys are the same in every run
    cut = round(held_out * len(order))
    return order[:cut] if split == "heldout" else order[cut:]


class Facts:
    """Where and how often key–value statements are planted, and which keys and values each split uses.

    ``rate``: facts (statement + restatement) per 1,000 tokens; ``min_distance``/``max_distance``: tokens
    from a statement to its restatement; ``held_out``: share of keys and values kept for validation
    and evaluation.
    """

    def __init__(self, rate: float = 4.0, min_distance: int = 16, max_distance: int = 64, held_out: float = 0.2):
        if rate < 0:
            raise ValueError(f"facts.rate={rate} is out of range: allowed >= 0 (facts per 1000 tokens)")
        if min_distance < 1 or max_distance < min_distance:
            raise ValueError(f"facts.min_distance={min_distance}, facts.max_distance={max_distance}: "
                             "allowed 1 <= min_distance <= max_distance (tokens)")
        if not 0 < held_out < 1:
            raise ValueError(f"facts.held_out={held_out} is out of range: allowed (0, 1)")
        self.rate, self.min_distance, self.max_distance = float(rate), int(min_distance), int(max_distance)
        self.held_out = float(held_out)
        self._keys = {s: _split(all_keys(), held_out, s) for s in SPLITS}
        self._values = {s: _split(all_values(), held_out, s) for s in SPLITS}
        self._memo: dict[tuple, list[int]] = {}

    def __getstate__(self) -> dict:  # the memo stays out: datasets' cache fingerprints pickle this object
        return {k: v for k, v in vars(self).items() if k != "_memo"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, _memo={})

    @classmethod
    def from_options(cls, options: dict) -> Facts:
        """``Facts(**options)``, with an unknown option named as ``facts.<key>`` (a config error, not a TypeError)."""
        allowed = ("rate", "min_distance", "max_distance", "held_out")
        unknown_option("facts", options, allowed)
        return cls(**options)

    def options(self) -> dict:
        return {"rate": self.rate, "min_distance": self.min_distance, "max_distance": self.max_distance,
                "held_out": self.held_out}

    def keys(self, split: str) -> list[str]:
        return self._keys[split]

    def values(self, split: str) -> list[str]:
        return self._values[split]

    def statement(self, tokenizer, key: str, value: str) -> tuple[list[int], int]:
        """A statement's token ids and the index of its value's first token (the value is the last
        four tokens before the full stop). Memoised: chunking tokenizes tens of thousands of them."""
        memo = (id(tokenizer), key, value)
        if memo not in self._memo:
            self._memo[memo] = tokenizer(TEMPLATE.format(key=key, value=value), add_special_tokens=False)["input_ids"]
        ids = self._memo[memo]
        return ids, len(ids) - 5

    def plant(self, prose: list[int], length: int, tokenizer, split: str, rng: random.Random):
        """``length`` tokens: facts planted into the start of ``prose``, which fills the rest.

        Returns ``(ids, facts, used)``: the tokens, one ``(key, value, first, second, value_offset)`` per
        planted fact (the two statements' start positions in ``ids``) and how many prose tokens were used.
        """
        count = int(self.rate * length / 1000 + rng.random())
        keys = rng.sample(self._keys[split], min(count, len(self._keys[split])))
        taken: list[tuple[int, int]] = []  # [start, end) of every statement placed
        placed, inserts = [], []
        for key in keys:
            value = rng.choice(self._values[split])
            ids, offset = self.statement(tokenizer, key, value)
            size = len(ids)
            for _ in range(20):
                distance = rng.randint(self.min_distance, self.max_distance)
                if distance < size or distance + size > length:
                    continue
                first = rng.randint(0, length - distance - size)
                spans = [(first, first + size), (first + distance, first + distance + size)]
                if all(e <= s0 or s >= e0 for s, e in spans for s0, e0 in taken):
                    taken += spans
                    placed.append((key, value, first, first + distance, offset))
                    inserts += [(first, ids), (first + distance, ids)]
                    break
        out, used = assemble(prose, length, inserts)
        return out, placed, used


def assemble(prose: list[int], length: int, inserts: list[tuple[int, list[int]]]):
    """``length`` tokens with each ``(position, tokens)`` of ``inserts`` (not overlapping) at its position and
    ``prose`` filling the gaps in order; returns ``(ids, used)``, ``used`` being the prose tokens taken."""
    ids: list[int] = []
    used = 0
    for position, tokens in sorted(inserts):
        gap = position - len(ids)
        ids += prose[used : used + gap]
        used += gap
        ids += tokens
    gap = length - len(ids)
    ids += prose[used : used + gap]
    used += gap
    if len(ids) != length:
        raise ValueError(f"{len(prose)} prose tokens do not fill {length} tokens around the statements")
    return ids, used
