"""RULER (Hsieh et al., 2024): the 13 standard synthetic long-context tasks, generated for any HF
tokenizer, plus a batched greedy-decoding runner.

Why a re-implementation: published RULER numbers come from NVIDIA/RULER's generator
(``scripts/data/synthetic``), and ports that drift from it (lm-eval's downloads its data, drops the
CWE one-shot example, miscomputes ``string_match_part`` and leaves the chat template and answer prefix
out of the length budget) give scores that cannot be compared. This package follows the
reference in everything that moves a score:

* the prompts, answer prefixes, needle sentence, noise block and tokens to generate, verbatim;
* haystacks (noise lines, Paul Graham essays split at sentence boundaries with needles at depths drawn
  from 40 evenly spaced percentages, or a haystack of distractor needles), key/value types and counts;
* the reference's *fixed-seed* shuffles: NIAH needle order, the CWE and FWE word streams and the QA
  document order are shuffled with a fresh ``Random(seed)``, so e.g. the gold QA document sits at the
  same slot for every sample with the same number of documents. That is an artefact, but published
  scores include it, so it is kept;
* the haystack sizing of the reference on request (``fit="reference"``: fixed steps, one probe, an
  overflowing sample drawn anew one step smaller), cross-checked against NVIDIA's ``niah.py``. That is
  the 2024 generator of the paper and its leaderboard; NVIDIA/RULER has sized niah, qa, vt and cwe by
  binary search since June 2025, which ``fit="exact"`` matches (``config.fit_upstream`` records which);
* the reference's own model templates (``templates``: ``base``, ``meta-chat``, ``meta-llama3``), which
  ``chat_template="auto"``, the default, picks for the Llama 2 / 3 models the reference names; other
  models get the tokenizer's chat template when it has one. The template that ran is recorded;
* the length budget counts the whole prompt as the evaluated model will see it: chat wrapper (if any),
  BOS, instruction, context and answer prefix, plus the task's tokens to generate.

Randomness comes from a ``random.Random`` per task and length, seeded by ``samples.sample_seed(seed,
task, length)``: the reference runs one process per task and length, and its samples differ between
lengths because its size search uses up a length-dependent number of draws; a derived seed gives the
same decorrelation (sample i does not reuse its key, value and depth at every length, nor sample 0 the
key of the other word-keyed NIAH tasks). A dataset depends only on (task, length, tokenizer, seed, chat
template, fit) and is byte-identical across runs. It is not byte-identical to the reference's own files:
those depend on its random stream and on NLTK's splitter.

Deliberate departures, none of which changes the task a model has to solve:

* by default (``fit="exact"``) the haystack size is searched to within 0.1% of the budget with
  interpolation, and a sample that does not fit is rebuilt from the same random draws with as many
  fewer units as its excess needs; the reference's fixed steps leave prompts 3-15% shorter at 4k and
  cannot build the essay and QA tasks below about 4k tokens, the lengths this project's tests use;
* the budget counts BOS when the tokenizer adds one (the reference's count omits it: one token);
* with the tokenizer's chat template, CWE's worked example becomes a previous user/assistant exchange
  (with RULER's templates it is a second wrapped prompt, as there); VT's example stays inside the user
  turn, as there;
* HotpotQA below 10 documents keeps the supporting paragraphs (the reference cannot go that short);
* VT variable names are always distinct; the sentence splitter is a regex instead of punkt;
* CWE beyond the ~8.7k distinct wonderwords words (around 128k tokens) needs the reference's
  ``english_words.json`` in ``data_dir``; without it the task reports a missing-data error.

What is where:

* ``tasks``: the reference's prompt text and the 13 tasks (``TASKS``, ``RulerTask``).
* ``templates``: the reference's model templates and which one ``chat_template`` picks.
* ``prompts``: rendering a sample as the model sees it, counting its tokens, the haystack-size search.
* ``generators``: one generator per task kind (niah, vt, cwe, fwe, qa).
* ``samples``: ``generate_samples``, a task's dataset at one length.
* ``runner``: ``run_ruler`` (decode and score every task x length), ``results_table``, ``write_results``.
* ``lctw.eval.ruler_sources`` (beside this package): the offline essays, QA sets and word lists.
"""

from lctw.eval.ruler.prompts import encode_prompt
from lctw.eval.ruler.runner import results_table, run_ruler, write_results
from lctw.eval.ruler.samples import generate_samples
from lctw.eval.ruler.tasks import TASKS, RulerTask
from lctw.eval.ruler_sources import MissingDataError, RulerError

__all__ = [
    "TASKS",
    "RulerTask",
    "RulerError",
    "MissingDataError",
    "generate_samples",
    "encode_prompt",
    "run_ruler",
    "results_table",
    "write_results",
]
