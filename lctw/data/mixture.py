"""Rows of several kinds, each drawn independently (``data.mixture``): what the copying base trains on.

Why: a tiny model learns to copy in context only when copying pays often enough (the induction circuit
forms after about 1–2M tokens of it), while plain prose keeps it a language model and shows what the
planted rows cost. Each row of a chunked document is one kind, drawn with the given shares:

* ``plain``:   the essay's tokens as they are;
* ``facts``:   key–value statements planted and restated (:class:`lctw.data.facts.Facts`, ``data.facts``);
* ``copies``:  copy spans planted into the prose (:class:`lctw.data.copies.Copies`, ``data.copies``);
* ``repeats``: one random span of ``copies.min_length`` to ``copies.max_length`` tokens repeated to fill
  the row (pure synthetic copying, no prose).

Every kind takes its row's place in the document (a repeats row skips that prose), so the shares are
shares of rows, and the train and validation splits keep their documents apart.
"""

from __future__ import annotations

import random

from lctw.data.copies import Copies, Vocabulary
from lctw.data.facts import Facts

KINDS = ("plain", "facts", "copies", "repeats")


class Mixture:
    """Shares of row kinds (``shares``: kind -> share, summing to 1) with the planting options they need."""

    def __init__(self, shares: dict[str, float], facts: Facts | None = None, copies: Copies | None = None):
        unknown = sorted(set(shares) - set(KINDS))
        if unknown:
            raise ValueError(f"mixture.{unknown[0]} is not a kind of row: allowed {list(KINDS)}")
        if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
            raise ValueError(f"mixture={dict(shares)}: the shares must be >= 0 and sum to 1")
        if shares.get("facts") and facts is None:
            raise ValueError("mixture.facts > 0 needs facts (the statements to plant): set data.facts")
        if (shares.get("copies") or shares.get("repeats")) and copies is None:
            raise ValueError("mixture.copies or mixture.repeats > 0 needs copies (the spans to plant): set data.copies")
        self.kinds = [(k, float(v)) for k, v in shares.items() if v > 0]
        self.facts, self.copies = facts, copies

    def options(self) -> dict:
        return dict(self.kinds)

    def kind(self, rng: random.Random) -> str:
        if len(self.kinds) == 1:  # no draw: a facts-only mixture plants exactly what data.facts always did
            return self.kinds[0][0]
        u, total = rng.random(), 0.0
        for kind, share in self.kinds:
            total += share
            if u < total:
                return kind
        return self.kinds[-1][0]

    def row(self, prose: list[int], length: int, tokenizer, vocabulary: Vocabulary, split: str,
            rng: random.Random) -> tuple[list[int], int]:
        """One row of ``length`` tokens from the start of ``prose`` (at least ``length`` tokens): ``(ids, used)``,
        ``used`` being the prose tokens it takes the place of."""
        kind = self.kind(rng)
        if kind == "facts":
            ids, _, used = self.facts.plant(prose, length, tokenizer, split, rng)
            return ids, used
        if kind == "copies":
            return self.copies.plant(prose[:length], vocabulary, split, rng)[0], length
        if kind == "repeats":
            span = rng.randint(self.copies.min_length, self.copies.max_length)
            return vocabulary.repeat(length, span, split, rng), length
        return list(prose[:length]), length
