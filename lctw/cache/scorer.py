"""The scorer that reads a fixed scorer's log-probs from the score cache instead of running θ′."""

from __future__ import annotations

from pathlib import Path

import torch

from lctw.cache.store import CHECKSUM, SHORT, row_checksum
from lctw.method.scorers import FixedScorer, Scorer


class CachedScorer(Scorer):
    """A fixed scorer's log-probs read from the batch (the score cache): no model, no forward pass.

    The data module carries the cached ``short_logprobs`` and ``checksum`` columns
    (:func:`lctw.cache.attach`); every batch's tokens are checked against the checksum the row was
    scored with, so a cache can never be applied to other data silently.
    """

    name = "cached"
    fixed = True

    def __init__(self, source: FixedScorer, path: str | Path):
        super().__init__(source.n, source.max_len)
        self.source_name, self.short, self.path = source.name, source.short, Path(path)

    def forward(self, theta, batch, long_logprobs):
        if SHORT not in batch or CHECKSUM not in batch:
            raise ValueError(f"the batch has no {SHORT!r} column: the train data must come from a data module "
                             "that lctw.cache.attach prepared")
        ids = batch["input_ids"]
        bad = row_checksum(ids) != batch[CHECKSUM].to(ids.device)
        if bad.any():
            raise ValueError(
                f"score cache {self.path}: {int(bad.sum())} of {len(bad)} rows of this batch have other tokens than "
                "the rows that were scored; the cache does not belong to this data: score again with score.py"
            )
        short = batch[SHORT]
        if short.shape != long_logprobs.shape:
            raise ValueError(f"score cache {self.path}: cached log-probs {tuple(short.shape)} do not match the "
                             f"batch's {tuple(long_logprobs.shape)}")
        return short.to(long_logprobs.device, torch.float32)
