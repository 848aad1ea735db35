"""One generator per RULER task kind (niah, vt, cwe, fwe, qa): random draws -> a sample's prompt text.

Each generator turns a number of haystack units (words, noise lines, distractor needles, list words,
zeta scale, documents) into a ``Draft``; ``generate_samples`` searches the number that fills the token
budget. ``build`` must draw all its randomness from ``rng``, except for the shuffles the reference does
with a fresh ``Random(seed)`` (``fixed_shuffle``), so that a probe on a cloned ``rng`` sees exactly the
draws of the real sample. What one kind needs beyond ``build`` (VT's worked example, CWE's word supply,
QA's number of questions) it does in the hooks of ``_Generator``.

One cohesive thing at about 400 lines: the five generators share the base class and its search
contract, and each is read beside the reference's own generator script.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Sequence

from lctw.eval.ruler.prompts import Draft, Prompter, clone_rng, count_plain, search_units
from lctw.eval.ruler.tasks import (
    CWE_PREFIX,
    CWE_TEMPLATE,
    DEPTHS,
    DOCUMENT,
    FWE_PREFIX,
    FWE_TEMPLATE,
    NEEDLE,
    NIAH_PREFIX,
    NIAH_TEMPLATE,
    NOISE,
    QA_PREFIX,
    QA_TEMPLATE,
    VT_PREFIX,
    VT_TEMPLATE,
    RulerTask,
)
from lctw.eval.ruler_sources import (
    MissingDataError,
    RulerError,
    english_words,
    essay_words,
    qa_dataset,
    split_sentences,
    word_lists,
)


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


class _Generator:
    """Samples of one task at one length.

    ``generate_samples`` calls, in this order: ``prepare`` once, ``build`` on probes while it searches the
    haystack size, ``check_size`` with the size found, then ``check_index`` and ``build`` for each sample.
    The hooks do nothing unless a kind overrides them.
    """

    min_units = 1
    max_units: int | None = None  # None: unbounded (haystacks repeat)

    def __init__(self, task: RulerTask, length: int, seed: int, data_dir):
        self.task, self.length, self.seed, self.data_dir = task, length, seed, data_dir

    def min_units_for(self, index: int) -> int:
        return self.min_units

    def fixed_shuffle(self, items: list) -> None:
        random.Random(self.seed).shuffle(items)

    def prepare(self, prompter: Prompter, rng: random.Random) -> None:
        """Hook: set up what all samples share, drawing from the task's ``rng`` before any sample does."""

    def check_size(self, num_units: int) -> None:
        """Hook: raise ``RulerError`` if the task cannot be made with the haystack size found."""

    def check_index(self, index: int) -> None:
        """Hook: raise ``RulerError`` if sample ``index`` cannot be made."""

    def build(self, n: int, rng: random.Random, index: int) -> Draft:
        raise NotImplementedError

    def step(self) -> int:
        """The reference's fixed step of haystack units (``fit=reference``)."""
        return 10

    def reference_start(self, step: int) -> int:
        """The first size the reference probes (``fit=reference``): one step."""
        return step


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

    def step(self):
        if self.haystack == "essay":
            return 500
        return 5 if self.length < 4096 else 25

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
        return Draft(
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

    def prepare(self, prompter: Prompter, rng: random.Random) -> None:
        """Make the worked example all samples share, ``ICL_TOKENS`` tokens counted without special tokens."""

        def build_icl(n, r):
            names, chains = self._chains(r, name_len=3, hops=min(10, self.num_hops), value="12345")
            text = VT_TEMPLATE.format(context=self._context(n, chains, r), query="12345")
            return text + VT_PREFIX.format(num_v=len(names[0]), query="12345"), names[0]

        def measure(n):
            return count_plain(prompter.tokenizer, build_icl(n, clone_rng(rng))[0])

        n, _ = search_units(measure, self.ICL_TOKENS, self.min_units, None, "vt example", self.ICL_TOKENS)
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
        return Draft(user, VT_PREFIX.format(num_v=self.num_hops + 1, query=value), names[0])


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

    def check_size(self, num_units):
        if num_units == self.max_units and self.large_words is None:
            raise MissingDataError(
                f"cwe at length {self.length} needs more than the {len(self.words)} distinct wonderwords words; "
                "the reference then samples from english_words.json (NVIDIA/RULER scripts/data/synthetic/json), "
                "which no installed package ships: put a copy in data_dir"
            )

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
        return Draft(CWE_TEMPLATE.format(context=context), CWE_PREFIX, answer, shots=[shot])


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

    def step(self):
        return max(1, self.length // 32)

    def reference_start(self, step):
        return self.length // self.word_len  # the reference's first guess of the number of words

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
        return Draft(FWE_TEMPLATE.format(context=" ".join(stream)), FWE_PREFIX, vocab[1:4])


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

    def check_index(self, index):
        if index >= len(self.data.items):
            raise RulerError(f"{self.task.name} has only {len(self.data.items)} questions")

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
        return Draft(QA_TEMPLATE.format(context=context, query=item.query), QA_PREFIX, list(item.outputs))


_GENERATORS = {
    "niah": _NiahGenerator,
    "vt": _VTGenerator,
    "cwe": _CWEGenerator,
    "fwe": _FWEGenerator,
    "qa": _QAGenerator,
}


def make_generator(task: RulerTask, length: int, seed: int, data_dir) -> _Generator:
    """The generator of ``task``'s kind for one length."""
    return _GENERATORS[task.kind](task, length, seed, data_dir)
