"""Short-context retention (MMLU, BBH) through EleutherAI's lm-eval, and LongBench as THUDM's code runs it,
on local data only, each computed as its authors compute it (the official profiles in ``tasks``).

Why: long-context training can cost short-context skill, so a run should report MMLU and BBH next to
RULER, plus LongBench for real long-document tasks, in numbers that can stand next to published tables.
lm-eval is the common reference runner for the first two, but its stock task configs download from the
hub. Here every task reads the user's own copies under ``data_dir``: the files are checked and
normalised in Python (so a missing or malformed file fails early with a message that names the path and
the expected format), written as JSONL next to generated task YAMLs, and lm-eval runs those. LongBench
follows its own ``pred.py`` (``longbench`` says why not lm-eval). Nothing is fetched.

Layout of ``data_dir`` (any subset; only what ``tasks`` asks for must exist)::

    mmlu/<subject>_test.{jsonl,json,parquet,csv}   required per subject
    mmlu/<subject>_dev.{...}                       few-shot source (needed when num_fewshot > 0)
    bbh/<task>.{json,jsonl}                        {"examples": [{"input", "target"}]} or JSONL rows
    bbh/<task>.txt | bbh/<task>_fewshot.jsonl      official cot-prompts file (description + exemplars) or
                                                   {"input", "target"} exemplars (needed when num_fewshot > 0)
    longbench/<task>.jsonl                         LongBench's own files (data.zip); <task>_e.jsonl are
                                                   LongBench-E, run only as ``longbench_e`` / ``longbench_<task>_e``

What is where, one job per module:

* ``tasks``: the families and their protocols, the LongBench task table (``LONGBENCH_TASKS``).
* ``metrics``: the LongBench and BBH per-sample metrics, as the references compute them.
* ``readers``: finding, reading and checking the local files (``HarnessDataError``).
* ``lmeval``: the normalised JSONL and task YAMLs lm-eval runs (MMLU, BBH).
* ``longbench``: LongBench's prompts, truncation, chat wrapper, generation and scoring (``pred.py`` /
  ``eval.py``); the wrappers themselves are ``tasks.LONGBENCH_TEMPLATES`` (``lctw.eval.templates``).
* ``runner``: ``run_harness``, and the results as a table (``results_table``, ``write_harness_results``).

All scores are reported on 0-100 (accuracy in percent), like RULER's.
"""

from lctw.eval.harness.longbench import longbench_prompt, run_longbench_task
from lctw.eval.harness.metrics import (
    bbh_exact_match,
    classification_score,
    code_sim_score,
    count_score,
    longbench_score,
    qa_f1_score,
    retrieval_score,
    rouge_score,
)
from lctw.eval.harness.readers import HarnessDataError, parse_bbh_prompt
from lctw.eval.harness.runner import (
    longbench_average,
    resolve_longbench_template,
    results_table,
    run_harness,
    write_harness_results,
)
from lctw.eval.harness.tasks import LONGBENCH_TASKS, LONGBENCH_TEMPLATES, LongBenchTask

__all__ = [
    "LONGBENCH_TASKS",
    "LONGBENCH_TEMPLATES",
    "HarnessDataError",
    "LongBenchTask",
    "run_harness",
    "write_harness_results",
    "results_table",
    "longbench_prompt",
    "run_longbench_task",
    "resolve_longbench_template",
    "longbench_average",
    "qa_f1_score",
    "rouge_score",
    "classification_score",
    "retrieval_score",
    "count_score",
    "code_sim_score",
    "longbench_score",
    "bbh_exact_match",
    "parse_bbh_prompt",
]
