"""RULER scoring, matching the reference evaluator (NVIDIA/RULER ``scripts/eval``).

Both metrics are case-insensitive substring tests of each reference string against the whole
prediction, averaged over samples and scaled to 0-100:

* ``string_match_all`` (NIAH, VT, CWE, FWE): per sample, the fraction of references found.
* ``string_match_part`` (QA): per sample, 1 if any reference is found. lm-eval's port gets this one
  wrong; here it is the reference's ``max`` over references.

Predictions are cleaned first exactly like the reference: strip, turn every ASCII control character
into a newline, strip again. Scores are not rounded here (the reference rounds each task to two
decimals before averaging; the difference is below 0.01 points).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    return _CONTROL_CHARS.sub("\n", pred.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} reference lists")
    if not preds:
        raise ValueError("cannot score an empty set of predictions")
    if any(isinstance(r, str) or len(r) == 0 for r in refs):
        raise ValueError("each sample needs a non-empty list of reference strings")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    _check(preds, refs)
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        pred = pred.lower()
        total += sum(r.lower() in pred for r in ref) / len(ref)
    return total / len(preds) * 100


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    _check(preds, refs)
    total = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        pred = pred.lower()
        total += float(any(r.lower() in pred for r in ref))
    return total / len(preds) * 100


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
