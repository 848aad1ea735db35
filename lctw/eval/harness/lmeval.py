"""lm-eval task configs for the local data: normalised JSONL plus one generated YAML per task.

lm-eval's stock configs download from the hub; these read the rows ``readers`` checked, written as JSONL
next to the YAMLs (``dataset_path: json``), which lm-eval loads through ``TaskManager(include_path=...)``.
The YAMLs stay inspectable in ``work_dir`` and can be reused with ``lm_eval --include_path``. Task names
carry the ``lctw_`` prefix so they never clash with lm-eval's built-in ones.

lm-eval resolves ``!function <file>.<name>`` against a Python file next to the YAML, so a one-line
``lctw_harness_utils.py`` is written there that imports the per-sample hooks below from this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lctw.eval.harness.metrics import bbh_exact_match, longbench_score
from lctw.eval.harness.readers import read_bbh, read_longbench, read_mmlu
from lctw.eval.harness.tasks import BBH_MAX_GEN_TOKS, BBH_UNTIL, LONGBENCH_TASKS, MMLU_LETTERS, longbench_base

PREFIX = "lctw_"
UTILS = f"{PREFIX}harness_utils"  # the module the YAMLs' !function values name


# --- Per-sample hooks, called by lm-eval through the generated utils file ------------------------------


def bbh_process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": bbh_exact_match(results[0], doc["target"])}


def longbench_process_results(doc: dict, results: list[str]) -> dict:
    task = doc["lctw_task"]
    name = LONGBENCH_TASKS[longbench_base(task)].metric
    return {name: longbench_score(task, results[0], doc["answers"], doc.get("all_classes"))}


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

    def __init__(self, data_dir: Path, work: Path, num_fewshot: int, tokenizer, longbench_max_length: int | None,
                 chat: bool):
        self.data_dir, self.work, self.k = data_dir, work, num_fewshot
        self.tokenizer, self.lb_max, self.chat = tokenizer, longbench_max_length, chat
        hooks = ", ".join(f.__name__ for f in (bbh_process_results, longbench_process_results))
        (work / f"{UTILS}.py").write_text(f"from {__name__} import {hooks}  # noqa: F401\n")

    def write(self, family: str, name: str) -> str:
        """Write the task ``name`` of ``family`` (mmlu, bbh or longbench); return its lm-eval task name."""
        return getattr(self, f"_{family}")(name)

    def _mmlu(self, subject: str) -> str:
        test, dev = read_mmlu(self.data_dir, subject, self.k)
        files = {"test": self._normalised(f"mmlu_{subject}_test", test)}
        config: dict[str, Any] = {}
        if dev is not None:
            files["dev"] = self._normalised(f"mmlu_{subject}_dev", dev)
            config = {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        task = f"{PREFIX}mmlu_{subject}"
        _dump(self.work / f"{task}.yaml", {
            "task": task, "task_alias": subject, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
            "test_split": "test", **config, "output_type": "multiple_choice", "num_fewshot": self.k,
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": list(MMLU_LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })
        return task

    def _bbh(self, name: str) -> str:
        rows, description, shots = read_bbh(self.data_dir, name, self.k)
        task = f"{PREFIX}bbh_{name}"
        config = {
            "task": task, "task_alias": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": self._normalised(f"bbh_{name}", rows)}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": self.k,
            "doc_to_text": "Q: {{input}}\nA:", "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": BBH_UNTIL, "do_sample": False, "max_gen_toks": BBH_MAX_GEN_TOKS},
            "process_results": f"!function {UTILS}.{bbh_process_results.__name__}",
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        if description:
            config["description"] = description + "\n\n"
        if self.k:
            config["fewshot_config"] = {"sampler": "first_n", "samples": shots[: self.k]}
        _dump(self.work / f"{task}.yaml", config)
        return task

    def _longbench(self, name: str) -> str:
        rows = read_longbench(self.data_dir, name)
        spec = LONGBENCH_TASKS[longbench_base(name)]
        docs = [{"prompt": self._longbench_prompt(spec.prompt.format(context=row["context"], input=row["input"]),
                                                  spec.chat),
                 "answers": [str(a) for a in row["answers"]], "all_classes": list(row.get("all_classes") or []),
                 "lctw_task": name, "length": row.get("length")} for row in rows]
        task = f"{PREFIX}longbench_{name}"
        _dump(self.work / f"{task}.yaml", {
            "task": task, "task_alias": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": self._normalised(f"longbench_{name}", docs)}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answers[0]}}",
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": spec.max_new_tokens},
            "process_results": f"!function {UTILS}.{longbench_process_results.__name__}",
            "metric_list": [{"metric": spec.metric, "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })
        return task

    def _longbench_prompt(self, prompt: str, chat: bool) -> str:
        """Middle truncation to ``longbench_max_length`` tokens, then the chat wrapper (as LongBench's pred.py)."""
        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if self.lb_max is not None and len(ids) > self.lb_max:
            half = self.lb_max // 2
            prompt = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:],
                                                                                  skip_special_tokens=True)
        if self.chat and chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return prompt

    def _normalised(self, stem: str, rows: list[dict]) -> str:
        path = self.work / "data" / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, rows)
        return str(path.resolve())
