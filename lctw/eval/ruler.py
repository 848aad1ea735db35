"""RULER (Hsieh et al., 2024): the 13 standard synthetic long-context tasks, generated for any HF
tokenizer, plus a batched greedy-decoding runner.

Why a re-implementation: published RULER numbers come from NVIDIA/RULER's generator
(``scripts/data/synthetic``), and ports that drift from it (lm-eval's downloads its data, drops the
CWE one-shot example, miscomputes ``string_match_part`` and leaves the chat template and answer prefix
out of the length budget) give scores that cannot be compared. This module follows the
reference in everything that moves a score:

* the prompts, answer prefixes, needle sentence, noise block and tokens to generate, verbatim;
* haystacks (noise lines, Paul Graham essays split at sentence boundaries with needles at depths drawn
  from 40 evenly spaced percentages, or a haystack of distractor needles), key/value types and counts;
* the reference's *fixed-seed* shuffles: NIAH needle order, the CWE and FWE word streams and the QA
  document order are shuffled with a fresh ``Random(seed)``, so e.g. the gold QA document sits at the
  same slot for every sample with the same number of documents. That is an artefact, but published
  scores include it, so it is kept;
* one haystack size per task and length, found on a probe sample, then reduced per sample only when
  that sample does not fit (the reference does the same; QA samples with short documents therefore
  come out shorter than the target, as in the reference);
* the length budget counts the whole prompt as the evaluated model will see it: chat wrapper (if any),
  BOS, instruction, context and answer prefix, plus the task's tokens to generate.

Randomness comes from a ``random.Random(seed)`` created per task and length, like the reference (one
process per task and length, seeded 42), so a dataset depends only on (task, length, tokenizer, seed,
chat flag) and is byte-identical across runs. It is not byte-identical to the reference's own files:
those depend on how many probes its search consumed from the same stream and on NLTK's splitter.

Deliberate departures, none of which changes the task a model has to solve:

* the haystack size is searched to within 0.1% of the budget with interpolation (the reference bisects
  exactly, or for FWE steps by 1/32 of the length), and a sample that does not fit is rebuilt from the
  same random draws with as many fewer units as its excess needs (the reference draws a new sample
  with a fixed number of units fewer);
* the budget counts BOS when the tokenizer adds one (the reference's count omits it: one token);
* with a chat template, CWE's worked example becomes a previous user/assistant exchange (the reference
  pastes a second copy of its model template); VT's example stays inside the user turn, as there;
* HotpotQA below 10 documents keeps the supporting paragraphs (the reference cannot go that short);
* VT variable names are always distinct; the sentence splitter is a regex instead of punkt;
* CWE beyond the ~8.7k distinct wonderwords words (around 128k tokens) needs the reference's
  ``english_words.json`` in ``data_dir``; without it the task reports a missing-data error.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctw.eval.metrics import METRICS, postprocess_pred
from lctw.eval.ruler_sources import (
    MissingDataError,
    RulerError,
    english_words,
    essay_words,
    qa_dataset,
    split_sentences,
    word_lists,
)

__all__ = [
    "TASKS",
    "RulerTask",
    "RulerError",
    "MissingDataError",
    "generate_samples",
    "encode_prompt",
    "evaluate",
    "results_table",
    "write_results",
]

# --- Prompt text (verbatim from the reference; these strings are part of the benchmark) ---------------

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
    "{type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
    "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"

# np.round(np.linspace(0, 100, 40)) -- no value lands on .5, so Python's round agrees.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class RulerTask:
    name: str
    kind: str  # niah | vt | cwe | fwe | qa
    max_new_tokens: int
    metric: str  # key of lctw.eval.metrics.METRICS
    params: dict[str, Any] = field(default_factory=dict)


def _niah(name, haystack, type_k, type_v, k=1, v=1, q=1):
    params = dict(
        type_haystack=haystack,
        type_needle_k=type_k,
        type_needle_v=type_v,
        num_needle_k=k,
        num_needle_v=v,
        num_needle_q=q,
    )
    return RulerTask(name, "niah", 128, "string_match_all", params)


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in (
        _niah("niah_single_1", "noise", "words", "numbers"),
        _niah("niah_single_2", "essay", "words", "numbers"),
        _niah("niah_single_3", "essay", "words", "uuids"),
        _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
        _niah("niah_multikey_2", "needle", "words", "numbers"),
        _niah("niah_multikey_3", "needle", "uuids", "uuids"),
        _niah("niah_multivalue", "essay", "words", "numbers", v=4),
        _niah("niah_multiquery", "essay", "words", "numbers", q=4),
        RulerTask("vt", "vt", 30, "string_match_all", dict(num_chains=1, num_hops=4)),
        RulerTask("cwe", "cwe", 120, "string_match_all", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
        RulerTask("fwe", "fwe", 50, "string_match_all", dict(alpha=2.0, coded_wordlen=6)),
        RulerTask("qa_1", "qa", 32, "string_match_part", dict(dataset="squad")),
        RulerTask("qa_2", "qa", 32, "string_match_part", dict(dataset="hotpotqa")),
    )
}


# --- Prompt rendering and token counting ------------------------------------------------------------


@dataclass
class _Draft:
    """One candidate sample before it is wrapped for the model."""

    user: str  # instruction + context + question
    answer_prefix: str
    outputs: list[str]
    shots: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) worked examples


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of a generated ``input`` exactly as the length budget counted them.

    Plain prompts get the tokenizer's special tokens (BOS) added; chat-rendered prompts already contain
    them as text, so nothing is added (the same convention as ``apply_chat_template(tokenize=True)``).
    """
    return tokenizer(text, add_special_tokens=not chat_template, verbose=False)["input_ids"]


class _Prompter:
    def __init__(self, tokenizer, chat_template: bool):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat = chat_template

    def render(self, draft: _Draft) -> str:
        if not self.chat:
            shots = "".join(f"{user}{reply}\n" for user, reply in draft.shots)
            return shots + draft.user + draft.answer_prefix
        messages = []
        for user, reply in draft.shots:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": draft.user})
        wrapped = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The answer prefix starts the assistant's turn, as with the reference's model templates.
        return wrapped + draft.answer_prefix

    def count(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text, self.chat))


# --- Random values ----------------------------------------------------------------------------------


class _KeyMaker:
    """Random needle keys/values: adjective-noun words, 7-digit numbers or uuid4 strings."""

    def __init__(self, data_dir, need_words: bool):
        self.adjs = self.nouns = ()
        if need_words:
            nouns, adjs, _ = word_lists(data_dir)
            # The reference samples uniformly from sorted(set("adj-noun")); indexing the product of the
            # two de-duplicated lists samples the same pairs without materialising ~6M strings.
            self.adjs, self.nouns = sorted(set(adjs)), sorted(set(nouns))

    def __call__(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if kind == "words":
            a, n = divmod(rng.randrange(len(self.adjs) * len(self.nouns)), len(self.nouns))
            return f"{self.adjs[a]}-{self.nouns[n]}"
        raise ValueError(f"unknown needle type {kind!r}")


def _riemann_zeta(s: float) -> float:
    """zeta(s) for s > 1 (Euler-Maclaurin; avoids a scipy dependency for one constant)."""
    if s == 2.0:
        return math.pi**2 / 6
    n = 20
    total = sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + n**-s / 2
    # Bernoulli terms B2, B4, B6, B8 of the tail correction.
    coeffs, rising, power = (1 / 6, -1 / 30, 1 / 42, -1 / 30), s, n ** (-s - 1)
    for j, b in enumerate(coeffs, start=1):
        total += b / math.factorial(2 * j) * rising * power
        rising *= (s + 2 * j - 1) * (s + 2 * j)
        power /= n * n
    return total


# --- Task generators --------------------------------------------------------------------------------
# Each generator turns a number of haystack units (words, noise lines, distractor needles, list words,
# zeta scale, documents) into a _Draft. `build` must draw all its randomness from `rng`, except for the
# shuffles the reference does with a fresh Random(seed).


class _Generator:
    min_units = 1
    max_units: int | None = None  # None: unbounded (haystacks repeat)

    def __init__(self, task: RulerTask, length: int, seed: int, data_dir):
        self.task, self.length, self.seed, self.data_dir = task, length, seed, data_dir

    def min_units_for(self, index: int) -> int:
        return self.min_units

    def fixed_shuffle(self, items: list) -> None:
        random.Random(self.seed).shuffle(items)

    def build(self, n: int, rng: random.Random, index: int) -> _Draft:
        raise NotImplementedError


class _NiahGenerator(_Generator):
    def __init__(self, task, length, seed, data_dir):
        super().__init__(task, length, seed, data_dir)
        p = task.params
        self.haystack = p["type_haystack"]
        self.type_k, self.type_v = p["type_needle_k"], p["type_needle_v"]
        self.num_v, self.num_q = p["num_needle_v"], p["num_needle_q"]
        self.num_k = max(p["num_needle_k"], self.num_q)
        self.keys = _KeyMaker(data_dir, "words" in (self.type_k, self.type_v))
        self.words = essay_words(data_dir) if self.haystack == "essay" else None
        if self.haystack != "essay":  # needles go between haystack lines, at distinct positions
            self.min_units = self.num_k * self.num_v
        self._sentences: tuple[int, list[str]] | None = None

    def _essay_sentences(self, n: int) -> list[str]:
        if self._sentences is None or self._sentences[0] != n:
            words = self.words
            if n > len(words):
                words = words * math.ceil(n / len(words))
            self._sentences = (n, split_sentences(" ".join(words[:n])))
        return self._sentences[1]

    def build(self, n, rng, index):
        keys, values, needles = [], [], []
        for _ in range(self.num_k):
            keys.append(self.keys(self.type_k, rng))
            values.append([])
            for _ in range(self.num_v):
                values[-1].append(self.keys(self.type_v, rng))
                needles.append(NEEDLE.format(type_needle_v=self.type_v, key=keys[-1], value=values[-1][-1]))
        self.fixed_shuffle(needles)

        if self.haystack == "essay":
            sentences = self._essay_sentences(n)
            cuts = sorted(int(len(sentences) * (depth / 100)) for depth in rng.sample(DEPTHS, len(needles)))
            pieces, start = [], 0
            for cut, needle in zip(cuts, needles, strict=True):
                pieces += [" ".join(sentences[start:cut]), needle]
                start = cut
            pieces.append(" ".join(sentences[start:]))
            context = " ".join(pieces)
        else:
            if self.haystack == "noise":
                lines = [NOISE] * n
            else:  # "needle": every line is a distractor needle with its own random key and value
                lines = [
                    NEEDLE.format(
                        type_needle_v=self.type_v,
                        key=self.keys(self.type_k, rng),
                        value=self.keys(self.type_v, rng),
                    )
                    for _ in range(n)
                ]
            for pos, needle in zip(
                sorted(rng.sample(range(n), len(needles)), reverse=True), needles, strict=True
            ):
                lines.insert(pos, needle)
            context = "\n".join(lines)

        picked = rng.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in picked]
        answers = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

        template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, self.type_v
        if self.num_q * self.num_v == 1:  # one answer: the reference rewrites the prompt in the singular
            template, prefix = (_singular(t) for t in (template, prefix))
            type_v = type_v[:-1]
        return _Draft(
            user=template.format(type_needle_v=type_v, context=context, query=query),
            answer_prefix=prefix.format(type_needle_v=type_v, query=query),
            outputs=answers,
        )


def _singular(text: str) -> str:
    # Same substring rewrites, in the same order, as the reference.
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


class _VTGenerator(_Generator):
    """Variable tracking: one chain VAR A = 12345, VAR B = VAR A, ... hidden among noise lines.

    A worked example (3-letter names, value 12345, filled to 500 tokens) is made once per task and
    length and re-randomised (names, value) for every sample, as in the reference.
    """

    ICL_TOKENS = 500

    def __init__(self, task, length, seed, data_dir):
        super().__init__(task, length, seed, data_dir)
        self.num_chains, self.num_hops = task.params["num_chains"], task.params["num_hops"]
        self.min_units = self.num_hops + 1
        self.icl: str | None = None

    def make_icl(self, prompter: _Prompter, rng: random.Random) -> None:
        def build_icl(n, r):
            names, chains = self._chains(r, name_len=3, hops=min(10, self.num_hops), value="12345")
            text = VT_TEMPLATE.format(context=self._context(n, chains, r), query="12345")
            return text + VT_PREFIX.format(num_v=len(names[0]), query="12345"), names[0]

        def measure(n):
            return _count_plain(prompter.tokenizer, build_icl(n, _clone(rng))[0])

        n, _ = _search_units(measure, self.ICL_TOKENS, self.min_units, None, "vt example", self.ICL_TOKENS)
        text, names = build_icl(n, rng)
        self.icl = f"{text} {' '.join(names)}\n"

    def _chains(self, rng, name_len, hops, value=None):
        names_all: list[str] = []
        while len(names_all) < (hops + 1) * self.num_chains:
            name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
            if name not in names_all:
                names_all.append(name)
        names, chains = [], []
        for c in range(self.num_chains):
            chain_names = names_all[c * (hops + 1) : (c + 1) * (hops + 1)]
            first = value if value is not None else str(rng.randint(10000, 99998))  # np.randint's range
            names.append(chain_names)
            chains.append(
                [f"VAR {chain_names[0]} = {first}"]
                + [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(hops)]
            )
        return names, chains

    @staticmethod
    def _context(n, chains, rng):
        lines = [NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, pos in enumerate(positions):
                lines.insert(pos + j, chain[j])
        return "\n".join(lines).replace(". \n", ".\n")

    def _randomized_icl(self, rng):
        old_names = self.icl.strip().split()[-(self.num_hops + 1) :]
        new_names = {old: "".join(rng.choices(string.ascii_uppercase, k=len(old))) for old in old_names}
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, old_names)) + r")\b")
        icl = pattern.sub(lambda m: new_names[m.group(0)], self.icl)
        return icl.replace("12345", str(rng.randint(10000, 99998)))

    def build(self, n, rng, index):
        names, chains = self._chains(rng, name_len=5, hops=self.num_hops)
        value = chains[0][0].split("=")[-1].strip()
        context = self._context(n, chains, rng)
        user = self._randomized_icl(rng) + "\n" + VT_TEMPLATE.format(context=context, query=value)
        return _Draft(user, VT_PREFIX.format(num_v=self.num_hops + 1, query=value), names[0])


class _CWEGenerator(_Generator):
    """Common words extraction: a numbered list where 10 words repeat often and the rest rarely."""

    def __init__(self, task, length, seed, data_dir):
        super().__init__(task, length, seed, data_dir)
        p = task.params
        self.num_cw = p["num_cw"]
        # Below 4k tokens the reference lowers the repeats (6/1) and uses a smaller worked example.
        if length < 4096:
            self.freqs, self.example = (6, 1), (20, 3, 1)
        else:
            self.freqs, self.example = (p["freq_cw"], p["freq_ucw"]), (40, 10, 3)
        nouns, adjs, verbs = word_lists(data_dir)
        self.words = sorted(set(nouns + adjs + verbs))
        self.fixed_shuffle(self.words)
        self.large_words = english_words(data_dir)
        self.min_units = self.num_cw
        self.max_units = len(self.large_words) if self.large_words else len(self.words)

    def _word_list(self, num_words, cw_repeats, ucw_repeats, rng):
        pool = self.words if num_words <= len(self.words) else self.large_words
        chosen = rng.sample(pool, num_words)
        common, uncommon = chosen[: self.num_cw], chosen[self.num_cw :]
        stream = common * cw_repeats + uncommon * ucw_repeats
        self.fixed_shuffle(stream)
        return _numbered(stream), common

    def build(self, n, rng, index):
        example_context, example_answer = self._word_list(*self.example, rng)
        context, answer = self._word_list(n, *self.freqs, rng)
        shot = (CWE_TEMPLATE.format(context=example_context), f"{CWE_PREFIX} {_numbered(example_answer)}")
        return _Draft(CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer, shots=[shot])


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class _FWEGenerator(_Generator):
    """Frequent words extraction: random 6-letter words with zeta(alpha)-distributed counts.

    ``n`` scales the counts: the word of rank k appears int(n * k**-alpha / zeta(alpha)) times. Rank 1
    is replaced by the noise token "..." (the prompt says '....'; the reference text uses three dots),
    so the answer is ranks 2-4.
    """

    def __init__(self, task, length, seed, data_dir):
        super().__init__(task, length, seed, data_dir)
        self.alpha, self.word_len = task.params["alpha"], task.params["coded_wordlen"]
        self.vocab_size = (length - task.max_new_tokens) // 50
        if self.vocab_size < 5:
            raise RulerError(f"fwe needs a length of at least {5 * 50 + task.max_new_tokens} tokens")
        self.zeta = _riemann_zeta(self.alpha)

    def build(self, n, rng, index):
        vocab = [
            "".join(rng.choices(string.ascii_lowercase, k=self.word_len)) for _ in range(self.vocab_size)
        ]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=self.word_len)))
        vocab = sorted(set(vocab))
        self.fixed_shuffle(vocab)
        vocab[0] = "..."
        stream = [
            w for k, w in enumerate(vocab, start=1) for _ in range(int(n * (k**-self.alpha) / self.zeta))
        ]
        self.fixed_shuffle(stream)
        return _Draft(FWE_TEMPLATE.format(context=" ".join(stream)), FWE_PREFIX, vocab[1:4])


class _QAGenerator(_Generator):
    """QA: sample i asks question i of the dataset over its gold document(s) mixed with distractors.

    SQuAD distractors come first from the same article, then from the rest of the set; for HotpotQA
    the question's own 10 paragraphs (2 gold + 8 distractors) are always kept, and more documents are
    added at random. Below 10 documents (lengths the reference cannot produce) the supporting
    paragraphs are kept and the others sampled.
    """

    def __init__(self, task, length, seed, data_dir):
        super().__init__(task, length, seed, data_dir)
        self.data = qa_dataset(task.params["dataset"], data_dir)

    def min_units_for(self, index):
        return len(self.data.items[index].gold)

    def build(self, n, rng, index):
        item, docs = self.data.items[index], self.data.docs
        curr, more = list(item.context), list(item.more_context)
        if n >= len(docs):
            chosen = (list(range(len(docs))) * math.ceil(n / len(docs)))[:n]
        elif n < len(curr):
            others = [d for d in curr if d not in item.gold]
            keep = set(item.gold) | set(rng.sample(others, n - len(item.gold)))
            chosen = [d for d in curr if d in keep]
        elif n - len(curr) > len(more):
            excluded = set(curr) | set(more)
            extra = [i for i in range(len(docs)) if i not in excluded]
            chosen = curr + more + rng.sample(extra, n - len(curr) - len(more))
        else:
            chosen = curr + rng.sample(more, n - len(curr))
        texts = [docs[i] for i in chosen]
        self.fixed_shuffle(texts)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))
        return _Draft(QA_TEMPLATE.format(context=context, query=item.query), QA_PREFIX, list(item.outputs))


_GENERATORS = {
    "niah": _NiahGenerator,
    "vt": _VTGenerator,
    "cwe": _CWEGenerator,
    "fwe": _FWEGenerator,
    "qa": _QAGenerator,
}


# --- Fitting the haystack to the token budget -------------------------------------------------------


def _clone(rng: random.Random) -> random.Random:
    twin = random.Random()
    twin.setstate(rng.getstate())
    return twin


def _count_plain(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _search_units(
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


def _make_generator(task: RulerTask, length: int, seed: int, data_dir) -> _Generator:
    return _GENERATORS[task.kind](task, length, seed, data_dir)


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
    ``encode_prompt`` counts them), ``max_new_tokens`` and ``answer_prefix``;
    ``length + max_new_tokens <= length`` always holds. Raises ``MissingDataError`` if a data source is
    not installed and ``RulerError`` if the length is too short for the task.
    """
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    prompter = _Prompter(tokenizer, chat_template)
    budget = length - spec.max_new_tokens
    rng = random.Random(seed)
    gen = _make_generator(spec, length, seed, data_dir)
    if isinstance(gen, _VTGenerator):
        gen.make_icl(prompter, rng)

    # One haystack size for the task and length, found on a probe that sees the same random draws
    # as sample 0 (so sample 0 fits exactly).
    def measure(n: int) -> int:
        return prompter.count(prompter.render(gen.build(n, _clone(rng), 0)))

    num_units, tokens_per_unit = _search_units(
        measure, budget, gen.min_units_for(0), gen.max_units, task, length
    )
    if isinstance(gen, _CWEGenerator) and num_units == gen.max_units and gen.large_words is None:
        raise MissingDataError(
            f"cwe at length {length} needs more than the {len(gen.words)} distinct wonderwords words; the "
            "reference then samples from english_words.json (NVIDIA/RULER scripts/data/synthetic/json), "
            "which no installed package ships: put a copy in data_dir"
        )

    samples = []
    for index in range(num_samples):
        if isinstance(gen, _QAGenerator) and index >= len(gen.data.items):
            raise RulerError(f"{task} has only {len(gen.data.items)} questions")
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


# --- Runner -----------------------------------------------------------------------------------------


def _generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else pad_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        use_cache=True,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate(
    model,
    tokenizer,
    tasks: Iterable[str] | None,
    lengths: Iterable[int],
    num_samples: int,
    batch_size: int = 8,
    seed: int = 42,
    chat_template: bool = False,
    progress: bool = True,
    data_dir: str | Path | None = None,
) -> dict:
    """Generate RULER data, decode greedily with the KV cache, and score every task x length.

    Returns a dict with ``scores`` {task: {length: score}}, ``average`` {length: mean over the tasks
    that ran at that length}, ``errors`` {task: {length: message}} for tasks that could not be generated
    (e.g. data not installed), ``nulls`` (empty predictions), ``predictions`` {task: {length: [...]}} and
    ``config``. A RULER score is comparable with published ones only when all 13 tasks ran.
    """
    import torch
    from tqdm.auto import tqdm

    tasks = list(TASKS) if tasks is None else list(tasks)
    lengths = [int(x) for x in lengths]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown RULER tasks {unknown}")
    results: dict[str, Any] = {
        "scores": {},
        "average": {},
        "errors": {},
        "nulls": {},
        "predictions": {},
        "config": dict(
            tasks=tasks,
            lengths=lengths,
            num_samples=num_samples,
            seed=seed,
            chat_template=chat_template,
            batch_size=batch_size,
        ),
    }
    bar = tqdm(
        total=len(tasks) * len(lengths) * num_samples, desc="RULER", unit="sample", disable=not progress
    )
    was_training = model.training
    model.eval()
    try:
        for length in lengths:
            for task in tasks:
                bar.set_postfix_str(f"{task}@{length}")
                try:
                    samples = generate_samples(
                        task,
                        tokenizer,
                        length,
                        num_samples,
                        seed=seed,
                        chat_template=chat_template,
                        data_dir=data_dir,
                    )
                except RulerError as err:
                    results["errors"].setdefault(task, {})[length] = f"{type(err).__name__}: {err}"
                    bar.update(num_samples)
                    continue
                spec = TASKS[task]
                preds = []
                for start in range(0, len(samples), batch_size):
                    batch = samples[start : start + batch_size]
                    ids = [encode_prompt(tokenizer, s["input"], chat_template) for s in batch]
                    with torch.inference_mode():
                        preds += _generate_batch(model, tokenizer, ids, spec.max_new_tokens)
                    bar.update(len(batch))
                preds = [postprocess_pred(p) for p in preds]
                refs = [s["outputs"] for s in samples]
                results["scores"].setdefault(task, {})[length] = METRICS[spec.metric](preds, refs)
                results["nulls"].setdefault(task, {})[length] = sum(not p for p in preds)
                results["predictions"].setdefault(task, {})[length] = [
                    {"index": s["index"], "pred": p, "outputs": s["outputs"], "length": s["length"]}
                    for s, p in zip(samples, preds, strict=True)
                ]
    finally:
        bar.close()
        model.train(was_training)
    for length in lengths:
        ran = [results["scores"][t][length] for t in tasks if length in results["scores"].get(t, {})]
        if ran:
            results["average"][length] = sum(ran) / len(ran)
    return results


def results_table(results: dict):
    """Scores as a pandas DataFrame: one row per task plus ``average``, one column per length."""
    import pandas as pd

    lengths = results["config"]["lengths"]
    rows = {
        task: [results["scores"].get(task, {}).get(length, float("nan")) for length in lengths]
        for task in results["config"]["tasks"]
    }
    rows["average"] = [results["average"].get(length, float("nan")) for length in lengths]
    return pd.DataFrame.from_dict(rows, orient="index", columns=lengths)


def write_results(results: dict, out_dir: str | Path) -> str:
    """Write ``ruler_scores.csv`` and ``ruler_results.json`` (with predictions) to ``out_dir``.

    Returns the score table as printable text (missing task x length cells, e.g. data not installed,
    show as NaN and are listed below the table).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "ruler_scores.csv", index_label="task")
    with open(out / "ruler_results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    text = table.to_string(float_format=lambda x: f"{x:.2f}")
    for task, by_length in results["errors"].items():
        for length, message in by_length.items():
            text += f"\n{task}@{length}: {message}"
    return text
