"""Finding, reading and checking the user's local MMLU / BBH / LongBench files (layout: ``lctw.eval.harness``).

Nothing is downloaded, so a missing or malformed file is the most likely failure. Every file is read and
checked here, before lm-eval or the model is involved, and an error names the path and the expected
format. Rows come back normalised to one shape per family, whatever the file type:

* MMLU: ``{"question", "choices" (4 strings), "answer" (0-3)}`` from the cais/mmlu columns (``answer``
  0-3 or A-D) or the original headerless ``.csv`` (question, A, B, C, D, answer letter).
* BBH: ``{"input", "target"}`` rows; exemplars from ``<task>_fewshot.jsonl`` or, with the task's
  description, from the task's file of the official ``cot-prompts`` directory, read as lm-eval's
  ``bbh/_generate_configs.py`` reads it (``parse_bbh_prompt``): each exemplar's chain of thought is
  dropped, keeping the answer after "answer is" -- how lm-eval's answer-only ``bbh_fewshot`` prompts
  come from the CoT ones.
* LongBench: its own ``{"context", "input", "answers", ...}`` rows, unchanged.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from lctw.eval.harness.tasks import FAMILIES, LONGBENCH_TASKS, MMLU_LETTERS, longbench_base

DATA_EXTS = (".jsonl", ".json", ".parquet", ".csv")


class HarnessDataError(FileNotFoundError):
    """A task's local data is missing or not in the expected format."""


def expand_tasks(data_dir: Path, tasks: Sequence[str]) -> dict[str, list[str]]:
    """{family or task name as requested: [subtask names]}, checking that the data exists."""
    out: dict[str, list[str]] = {}
    for t in tasks:
        family, _, name = t.partition("_")
        if t == "longbench_e":  # LongBench-E: a separate benchmark on the same tasks (the _e files)
            family, name = "longbench", ""
        if family not in FAMILIES:
            raise KeyError(f"unknown harness task {t!r}: use mmlu, bbh, longbench or <family>_<name>")
        folder = data_dir / family
        if name:
            out[t] = [name]
            continue
        if not folder.is_dir():
            raise _missing(family, family, folder, "data folder")
        if family == "mmlu":
            names = sorted({m.group(1) for p in folder.iterdir()
                            if (m := re.fullmatch(r"(.+)_test\.(jsonl|json|parquet|csv)", p.name))})
        elif family == "bbh":
            names = sorted(p.stem for p in folder.iterdir()
                           if p.suffix in (".json", ".jsonl") and not p.stem.endswith("_fewshot"))
        else:
            e = t == "longbench_e"
            names = sorted(p.stem for p in folder.glob("*.jsonl")
                           if p.stem.endswith("_e") == e and longbench_base(p.stem) in LONGBENCH_TASKS)
        if not names:
            raise _missing(family, family, folder, "task files")
        out[t] = names
    return out


def read_mmlu(data_dir: Path, subject: str, num_fewshot: int) -> tuple[list[dict], list[dict] | None]:
    """A subject's test rows and, when ``num_fewshot > 0``, its dev rows (the few-shot source)."""
    folder = data_dir / "mmlu"
    test = _find(folder, f"{subject}_test")
    if test is None:
        raise _missing("mmlu", subject, folder, f"{subject}_test{{{','.join(DATA_EXTS)}}}")
    rows = _mmlu_rows(test)
    if not num_fewshot:
        return rows, None
    dev = _find(folder, f"{subject}_dev")
    if dev is None:
        raise _missing("mmlu", subject, folder, f"few-shot file {subject}_dev.* (num_fewshot={num_fewshot})")
    return rows, _mmlu_rows(dev)


def read_bbh(data_dir: Path, name: str, num_fewshot: int) -> tuple[list[dict], str, list[dict]]:
    """A task's rows, its description ("" without a cot-prompts file) and its answer-only exemplars.

    There are at least ``num_fewshot`` exemplars; the first ``num_fewshot`` are the ones to use.
    """
    folder = data_dir / "bbh"
    path = _find(folder, name)
    if path is None or path.suffix not in (".json", ".jsonl"):
        raise _missing("bbh", name, folder, f"{name}.json or {name}.jsonl")
    rows = _read_rows(path)
    _require(rows, path, ("input", "target"))
    rows = [{"input": str(r["input"]), "target": str(r["target"])} for r in rows]
    description, shots = "", []
    prompt_file, shot_file = folder / f"{name}.txt", _find(folder, f"{name}_fewshot")
    if prompt_file.exists():
        try:
            description, shots = parse_bbh_prompt(prompt_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise HarnessDataError(f"{prompt_file}: not a BBH cot-prompts file ({e})") from e
    elif shot_file is not None:
        shots = _read_rows(shot_file)
        _require(shots, shot_file, ("input", "target"))
        shots = [{"input": str(r["input"]), "target": str(r["target"])} for r in shots]
    if num_fewshot > len(shots):
        raise _missing("bbh", name, folder, f"{num_fewshot} few-shot exemplars ({name}.txt or {name}_fewshot.jsonl; "
                                            f"found {len(shots)})")
    return rows, description, shots


def read_longbench(data_dir: Path, name: str) -> list[dict]:
    """A LongBench (or LongBench-E ``<task>_e``) file's rows, each with a non-empty ``answers`` list."""
    folder = data_dir / "longbench"
    if longbench_base(name) not in LONGBENCH_TASKS:
        raise KeyError(f"unknown LongBench task {name!r}; choose from {sorted(LONGBENCH_TASKS)} (or <task>_e)")
    path = folder / f"{name}.jsonl"
    if not path.exists():
        raise _missing("longbench", name, folder, f"{name}.jsonl")
    rows = _read_rows(path)
    _require(rows, path, ("context", "input", "answers"))
    for i, row in enumerate(rows):
        if isinstance(row["answers"], str) or not len(row["answers"]):
            raise HarnessDataError(f"{path}: row {i}: 'answers' must be a non-empty list of strings")
    return rows


def parse_bbh_prompt(text: str) -> tuple[str, list[dict]]:
    """An official BBH ``cot-prompts/<task>.txt`` -> (description, answer-only exemplars).

    The file is a canary line, a ``-----`` line, the task description, then "Q: ...\nA: Let's think step
    by step. ... So the answer is X." exemplars, all separated by blank lines. As in lm-eval's generator:
    everything before the last ``-----`` line is dropped, the rest is split at blank lines, the answer is
    what follows the first "answer is " up to the line's last character (the final "."), and the question
    is what precedes "Let's think step by step.". The description is every paragraph before the first
    "Q: " one: snarks' has two, which lm-eval's generator would misread as an exemplar (its shipped
    ``bbh_fewshot_snarks`` and ``bbh_zeroshot_snarks`` YAMLs carry both paragraphs, and so does this).
    """
    head, sep, body = text.replace("\r\n", "\n").rpartition("\n-----\n")
    if not sep:
        raise ValueError("no '-----' line after the canary line")
    paragraphs = body.strip("\n").split("\n\n")
    first = next((i for i, p in enumerate(paragraphs) if p.startswith("Q: ")), len(paragraphs))
    description, blocks = "\n\n".join(paragraphs[:first]), paragraphs[first:]
    shots = []
    for block in blocks:
        answer = re.search(r"(?<=answer is )(.*)(?=.)", block)
        question = re.fullmatch(r"Q: (.*)\nA: ", block.split("Let's think step by step.")[0], flags=re.S)
        if answer is None or question is None:
            raise ValueError(f"cannot parse exemplar: {block[:80]!r}")
        shots.append({"input": question.group(1), "target": answer.group(0)})
    if not description:
        raise ValueError("no task description after the '-----' line")
    return description, shots


def _read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json (list, or {"examples": [...]}, or {"data": [...]}) / .parquet file."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                for key in ("examples", "data", "test"):
                    if isinstance(data.get(key), list):
                        return data[key]
                raise HarnessDataError(f"{path}: a JSON object needs an 'examples' list")
            return list(data)
        if path.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise HarnessDataError(f"{path}: cannot read ({e})") from e
    raise HarnessDataError(f"{path}: unsupported file type (use one of {DATA_EXTS})")


def _require(rows: list[dict], path: Path, fields: Sequence[str]) -> None:
    if not rows:
        raise HarnessDataError(f"{path}: no rows")
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise HarnessDataError(f"{path}: row {i} lacks {missing} (expected fields {list(fields)})")


def _mmlu_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            raw = [r for r in csv.reader(f) if r]
        bad = [i for i, r in enumerate(raw) if len(r) != 6]
        if bad:
            raise HarnessDataError(f"{path}: row {bad[0]} does not have 6 columns (question, A, B, C, D, answer)")
        rows = [{"question": r[0], "choices": r[1:5], "answer": r[5]} for r in raw]
    else:
        rows = _read_rows(path)
    _require(rows, path, ("question", "choices", "answer"))
    out = []
    for i, row in enumerate(rows):
        choices, answer = [str(c) for c in row["choices"]], row["answer"]
        if isinstance(answer, str) and answer.strip() in MMLU_LETTERS:
            answer = MMLU_LETTERS.index(answer.strip())
        if len(choices) != 4 or not isinstance(answer, int) or not 0 <= int(answer) < 4:
            raise HarnessDataError(f"{path}: row {i} needs 4 choices and an answer in 0-3 or A-D")
        out.append({"question": str(row["question"]), "choices": choices, "answer": int(answer)})
    return out


def _find(folder: Path, stem: str) -> Path | None:
    for ext in DATA_EXTS:
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return None


def _missing(family: str, name: str, folder: Path, what: str) -> HarnessDataError:
    return HarnessDataError(
        f"{family} task {name!r}: no {what} under {folder} (see lctw.eval.harness for the layout); "
        "nothing is downloaded, so point data_dir at your local copy"
    )
