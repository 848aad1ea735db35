"""lm-eval task configs for the local MMLU and BBH data: normalised JSONL plus one generated YAML per task.

lm-eval's stock configs download from the hub; these read the rows ``readers`` checked, written as JSONL
next to the YAMLs (``dataset_path: json``), which lm-eval loads through ``TaskManager(include_path=...)``.
The YAMLs stay inspectable in ``work_dir`` and can be reused with ``lm_eval --include_path``. Task names
carry the ``lctw_`` prefix so they never clash with lm-eval's built-in ones.

Scoring is lm-eval's own: ``acc`` for MMLU, its ``exact_match`` metric with the options of its BBH
templates. Zero-shot BBH also takes lm-eval's per-task answer filters: the ``filter_list`` of the installed
``lm_eval/tasks/bbh/zeroshot/<task>.yaml`` is copied into the generated YAML, and its ``!function utils.X``
filters resolve through a ``lctw_harness_utils.py`` written next to it that re-exports lm-eval's module.
LongBench does not go through lm-eval (``lctw.eval.harness.longbench`` says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lctw.eval.harness.readers import read_bbh, read_mmlu
from lctw.eval.harness.tasks import (
    BBH_FEWSHOT_UNTIL,
    BBH_MAX_GEN_TOKS,
    BBH_ZEROSHOT_MATCH,
    BBH_ZEROSHOT_UNTIL,
    MMLU_LETTERS,
)

PREFIX = "lctw_"
UTILS = f"{PREFIX}harness_utils"  # the module the YAMLs' !function values name
BBH_ZEROSHOT_UTILS = "lm_eval.tasks.bbh.zeroshot.utils"


def bbh_zeroshot_filters(name: str) -> str | None:
    """The ``filter_list`` block of lm-eval's ``bbh_zeroshot_<name>`` YAML, or None for a task it lacks."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "zeroshot" / f"{name}.yaml"
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    start = text.find("filter_list:")
    return None if start < 0 else text[start:].replace("!function utils.", f"!function {UTILS}.")


# --- Task YAML generation ---------------------------------------------------------------------------


def _dump(path: Path, config: dict) -> None:
    """Write a YAML lm-eval reads; ``!function`` values are written bare (JSON is valid YAML otherwise)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("!function "):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


class TaskWriter:
    """Writes a task's normalised JSONL and lm-eval YAML into ``work``, from the local data in ``data_dir``."""

    def __init__(self, data_dir: Path, work: Path, mmlu_fewshot: int, bbh_fewshot: int):
        self.data_dir, self.work = data_dir, work
        self.fewshot = {"mmlu": mmlu_fewshot, "bbh": bbh_fewshot}
        (work / f"{UTILS}.py").write_text(f"from {BBH_ZEROSHOT_UTILS} import *  # noqa: F401,F403\n")

    def write(self, family: str, name: str) -> str:
        """Write the task ``name`` of ``family`` (mmlu or bbh); return its lm-eval task name."""
        return getattr(self, f"_{family}")(name, self.fewshot[family])

    def _mmlu(self, subject: str, k: int) -> str:
        test, dev = read_mmlu(self.data_dir, subject, k)
        files = {"test": self._normalised(f"mmlu_{subject}_test", test)}
        config: dict[str, Any] = {}
        if dev is not None:
            files["dev"] = self._normalised(f"mmlu_{subject}_dev", dev)
            config = {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        task = f"{PREFIX}mmlu_{subject}"
        _dump(self.work / f"{task}.yaml", {
            "task": task, "task_alias": subject, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "test", **config, "output_type": "multiple_choice", "num_fewshot": k,
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": list(MMLU_LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })
        return task

    def _bbh(self, name: str, k: int) -> str:
        """k > 0: lm-eval's bbh_fewshot; k = 0: its bbh_zeroshot (stop strings, match options, filters)."""
        rows, description, shots = read_bbh(self.data_dir, name, k)
        task = f"{PREFIX}bbh_{name}"
        match = {} if k else BBH_ZEROSHOT_MATCH
        config = {
            "task": task, "task_alias": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": self._normalised(f"bbh_{name}", rows)}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": k,
            "doc_to_text": "Q: {{input}}\nA:", "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": BBH_FEWSHOT_UNTIL if k else BBH_ZEROSHOT_UNTIL, "do_sample": False,
                                  "temperature": 0.0, "max_gen_toks": BBH_MAX_GEN_TOKS},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **match}],
            "metadata": {"version": 3.0},
        }
        if description:
            config["description"] = description + "\n\n"
        if k:
            config["fewshot_config"] = {"sampler": "first_n", "samples": shots[:k]}
        path = self.work / f"{task}.yaml"
        _dump(path, config)
        filters = None if k else bbh_zeroshot_filters(name)
        if filters:
            with path.open("a", encoding="utf-8") as f:
                f.write(filters if filters.endswith("\n") else filters + "\n")
        return task

    def _normalised(self, stem: str, rows: list[dict]) -> str:
        path = self.work / "data" / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, rows)
        return str(path.resolve())
