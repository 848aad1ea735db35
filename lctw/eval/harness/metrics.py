"""LongBench and BBH per-sample metrics, re-implemented from THUDM/LongBench ``metrics.py`` (English tasks).

Why a re-implementation: lm-eval's copy imports jieba, fuzzywuzzy and rouge. These functions give the
reference's numbers without them:

* ``rouge_score`` is ROUGE-L as the ``rouge`` package (pltrdy, 1.0.1) computes it, which LongBench
  calls: sentences split at ".", words compared as *sets* (repeated words count once), summary-level
  union LCS, F with a 1e-8 guard. That is not ROUGE-L of Lin (2004) nor of Google's ``rouge_score``, but
  it is what published LongBench numbers use. One departure: the LCS is reconstructed iteratively (the
  package recurses and, through LongBench's bare ``except``, scores 0 for a sentence pair longer than
  Python's recursion limit).
* ``code_sim_score`` is ``fuzzywuzzy.fuzz.ratio`` as LongBench's ``requirements.txt`` installs it:
  fuzzywuzzy without python-Levenshtein, so difflib's ``SequenceMatcher`` (autojunk on), ``int(round(.))``
  of the percentage, 0 for an empty string. With python-Levenshtein installed fuzzywuzzy would switch to
  another ratio (a normalised indel distance) and lcc / repobench-p would move by a point or more; here
  the metric is pinned to difflib whatever is installed (the ``eval`` extra needs neither package).

Every metric returns a score in [0, 1] for one sample; the runner reports means on 0-100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

from lctw.eval.harness.tasks import LONGBENCH_TASKS, longbench_base


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction), num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token-level F1 of the normalised answer (bag of words), in [0, 1]."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of one LCS of x and y, reconstructed with the ``rouge`` package's tie-breaking."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores(...)["rouge-l"]["f"]`` (pltrdy 1.0.1), in [0, 1].

    Words are split on single spaces within "."-separated sentences and compared as sets; the overlap
    is the size of the union over reference sentences of the LCS words with every hypothesis sentence.
    An empty hypothesis or reference scores 0 (LongBench catches the package's ValueError).
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    llcs = 0
    for ref_s in ref:
        ref_words = ref_s.split(" ")
        before = len(union)
        for hyp_s in hyp_words:
            union |= set(_lcs_words(ref_words, hyp_s))
        llcs += len(union) - before
    r, p = llcs / m, llcs / n
    return 2.0 * (p * r) / (p + r + 1e-8)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """TREC: 1/k if the true class is among the k class names found in the prediction, else 0.

    Faithful to the reference, including two quirks: a matched name that is a substring of the true
    class is dropped while iterating over the same list (so the next element is skipped), and the
    difflib fallback for "no class found" never runs (the reference tests ``list != 0``), so that case
    scores 0.
    """
    matches = [c for c in all_classes if c in prediction]
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """passage_retrieval_en: the share of the numbers in the prediction that equal the gold paragraph id."""
    gold = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == gold for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the gold count."""
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(ground_truth) for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """lcc / repobench-p: similarity of the first line that is not a comment or a code fence."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n") if not any(c in ln for c in ("`", "#", "//"))), "")
    if line == ground_truth:  # fuzz.ratio's guards: equal strings 100, an empty one 0
        return 1.0
    if not line or not ground_truth:
        return 0.0
    return int(round(100 * SequenceMatcher(None, line, ground_truth).ratio())) / 100


LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def longbench_score(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None):
    """One sample's LongBench score in [0, 1]: the reference scorer's max over the gold answers."""
    spec = LONGBENCH_TASKS[longbench_base(task)]
    metric = LONGBENCH_METRICS[spec.metric]
    if spec.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max([0.0, *(metric(prediction, gt, all_classes=all_classes or ()) for gt in answers)])


def bbh_exact_match(prediction: str, target: str, ignore_case: bool = False,
                    regexes_to_ignore: Sequence[str] = ()) -> float:
    """lm-eval's ``exact_match`` (``exact_match_hf_evaluate``) on one pair, with the options BBH uses.

    Nothing is stripped: few-shot BBH (no options) scores a generation " False" as wrong against "False",
    as lm-eval does. Zero-shot BBH passes ``ignore_case`` and its ``regexes_to_ignore``, each removed from
    both strings in turn before the comparison.
    """
    for pattern in regexes_to_ignore:
        prediction, target = re.sub(pattern, "", prediction), re.sub(pattern, "", target)
    if ignore_case:
        prediction, target = prediction.lower(), target.lower()
    return float(prediction == target)
