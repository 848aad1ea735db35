"""The RULER benchmark's fixed text and its 13 standard tasks.

The prompt strings are part of the benchmark: they are verbatim from the reference
(NVIDIA/RULER ``scripts/data/synthetic``), and editing one makes scores incomparable with published ones.
``TASKS`` holds each task's generator kind, its tokens to generate, its metric and the reference's
parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
