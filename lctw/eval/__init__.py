"""Evaluation: RULER long-context benchmark (generation, greedy decoding, scoring)."""

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
