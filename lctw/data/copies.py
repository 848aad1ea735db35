"""Copy spans: a span of tokens restated later in the same row (``data.copies``, ``eval=copy``).

Why: a model extended from n to N can only be seen to use the new positions on tokens that the distant
context predicts. A restated span is the simplest such token: from its second token on, the span is
predictable by looking back d tokens, and only then. Planted at distances within and beyond n, spans
make the long-range share of the training tokens known, and held-out spans measure copying by distance.

A row (:meth:`Copies.plant`) is essay prose into which spans are planted until their second occurrences
cover ``density`` of the row. Each span draws a length L in [``min_length``, ``max_length``] and a
distance d (first occurrence's start to the second's) in [``min_distance``, ``max_distance``], by default
[L + 1, as far as the row allows], so the two occurrences never overlap; then the first position
uniformly among those that leave room. A span that would overlap one already planted is drawn again (the
row gives up after 50 draws). A share ``random`` of the spans are random token ids (an induction task
that prose cannot hint at); the others restate the prose already at the first position, verbatim (the
copying that real text asks for).

Held-out random spans: a random span is held out when its first two tokens fall in a fixed fifth of all
token pairs (:func:`held_out`); the train split draws only the other spans, ``eval=copy`` only these, so
no evaluated random span was ever trained on. Restated prose is held out by document (the validation
documents).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lctw.errors import unknown_option

SPLITS = ("train", "heldout")
GIVE_UP = 50  # draws of a span before a row stops planting


def held_out(span: Sequence[int]) -> bool:
    """Whether a random span belongs to the held-out fifth: a fixed hash of its first two tokens."""
    return (span[0] * 7919 + span[1] * 104729) % 5 == 0


class Vocabulary:
    """The token ids a random span draws from: every id of the tokenizer but its special tokens."""

    def __init__(self, size: int, special: Sequence[int]):
        self.ids = [i for i in range(size) if i not in set(special)]
        if len(self.ids) < 2:
            raise ValueError(f"a vocabulary of {size} tokens leaves {len(self.ids)} ids for random spans")

    @classmethod
    def of(cls, tokenizer) -> Vocabulary:
        return cls(len(tokenizer), tokenizer.all_special_ids)

    def span(self, length: int, split: str, rng: random.Random) -> list[int]:
        """``length`` random ids whose first two are held out exactly when ``split`` is ``heldout``."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed: choose one of {list(SPLITS)}")
        span = [rng.choice(self.ids) for _ in range(length)]
        while held_out(span) != (split == "heldout"):
            span[1] = rng.choice(self.ids)
        return span

    def repeat(self, length: int, span_length: int, split: str, rng: random.Random) -> list[int]:
        """A pure synthetic row: one random span repeated to fill ``length`` tokens."""
        span = self.span(span_length, split, rng)
        return (span * (length // span_length + 1))[:length]


class Copies:
    """Where and how densely copy spans are planted (see the module docstring)."""

    def __init__(self, density: float = 0.4, min_length: int = 4, max_length: int = 16,
                 min_distance: int | None = None, max_distance: int | None = None, random: float = 0.5):
        if not 0 < density < 1:
            raise ValueError(f"copies.density={density} is out of range: allowed (0, 1) (share of the row restated)")
        if not 2 <= min_length <= max_length:
            raise ValueError(f"copies.min_length={min_length}, copies.max_length={max_length}: allowed "
                             "2 <= min_length <= max_length (tokens)")
        if min_distance is not None and min_distance <= max_length:
            raise ValueError(f"copies.min_distance={min_distance} is out of range: allowed > max_length ({max_length}, "
                             "so that a span and its restatement never overlap) or null (= the span's length + 1)")
        if max_distance is not None and max_distance < (min_distance or max_length + 1):
            raise ValueError(f"copies.max_distance={max_distance} is out of range: allowed >= min_distance, or null "
                             "(= as far as the row allows)")
        if not 0 <= random <= 1:
            raise ValueError(f"copies.random={random} is out of range: allowed [0, 1] (share of random-token spans)")
        self.density, self.min_length, self.max_length = float(density), int(min_length), int(max_length)
        self.min_distance, self.max_distance, self.random = min_distance, max_distance, float(random)

    @classmethod
    def from_options(cls, options: dict) -> Copies:
        allowed = ("density", "min_length", "max_length", "min_distance", "max_distance", "random")
        unknown_option("copies", options, allowed)
        return cls(**options)

    def options(self) -> dict:
        return {"density": self.density, "min_length": self.min_length, "max_length": self.max_length,
                "min_distance": self.min_distance, "max_distance": self.max_distance, "random": self.random}

    def plant(self, prose: list[int], vocabulary: Vocabulary, split: str, rng: random.Random):
        """``prose`` (one row's tokens) with spans planted; returns ``(ids, spans)``, one ``(first, second,
        length, kind)`` per span (``kind``: ``random`` or ``prose``)."""
        ids, size = list(prose), len(prose)
        taken = [False] * size
        budget, spans = int(self.density * size), []
        for _ in range(GIVE_UP):
            if budget <= 0:
                break
            length = rng.randint(self.min_length, self.max_length)
            lo = self.min_distance or length + 1
            hi = min(self.max_distance or size, size - length)
            if hi < lo:
                continue
            distance = rng.randint(lo, hi)
            first = rng.randint(0, size - distance - length)
            second = first + distance
            if any(taken[first : first + length]) or any(taken[second : second + length]):
                continue
            kind = "random" if rng.random() < self.random else "prose"
            span = vocabulary.span(length, split, rng) if kind == "random" else ids[first : first + length]
            ids[first : first + length] = ids[second : second + length] = span
            for p in (first, second):
                taken[p : p + length] = [True] * length
            spans.append((first, second, length, kind))
            budget -= length
        return ids, spans
