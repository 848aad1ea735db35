"""Short-context retention (MMLU, BBH) and LongBench through EleutherAI's lm-eval, on local data only.

Why this module: long-context training can cost short-context skill, so a run should report MMLU and
BBH next to RULER, plus LongBench for real long-document tasks. lm-eval is the common reference
runner for the first two, but its stock task configs download from the hub. Here every task reads the
user's own copies under ``data_dir``: the files are checked and normalised in Python (so a missing or
malformed file fails early with a message that names the path and the expected format), written as
JSONL next to generated task YAMLs, and lm-eval loads those through ``TaskManager(include_path=...)``
with ``dataset_path: json``. Nothing is fetched; the YAMLs stay inspectable (``work_dir``) and can be
reused with ``lm_eval --include_path``.

Layout of ``data_dir`` (any subset; only what ``tasks`` asks for must exist)::

    mmlu/<subject>_test.{jsonl,json,parquet,csv}   required per subject
    mmlu/<subject>_dev.{...}                       few-shot source (needed when num_fewshot > 0)
    bbh/<task>.{json,jsonl}                        {"examples": [{"input", "target"}]} or JSONL rows
    bbh/<task>.txt | bbh/<task>_fewshot.jsonl      few-shot source (needed when num_fewshot > 0)
    longbench/<task>.jsonl                         LongBench's own files (data.zip), also <task>_e.jsonl

Formats and protocols, and what moves a score:

* **MMLU** (Hendrycks et al.): rows ``question``, ``choices`` (4 strings), ``answer`` (0-3 or A-D), the
  cais/mmlu columns; a ``.csv`` is the original headerless file (question, A, B, C, D, answer letter).
  Prompt, description and metric are lm-eval's ``mmlu`` (loglikelihood of " A".." D", ``acc``);
  few-shot examples are the first k of the subject's dev file, as there. ``mmlu`` is the micro average
  (weighted by subject size), like lm-eval's group score.
* **BBH** (Suzgun et al.): answer-only ("CoT-free") prompting, ``Q: {input}\\nA:`` with the task's
  description and k exemplars, greedy until ``Q:`` or a blank line, exact match of the stripped
  generation (lm-eval's ``bbh_fewshot``). A ``<task>.txt`` is a file of the official ``cot-prompts``
  directory: its description is used and each exemplar's chain of thought is dropped, keeping the
  answer after "So the answer is" -- this is how the paper's answer-only prompts relate to the CoT
  ones. ``bbh`` is the unweighted mean over tasks, as BBH reports.
* **LongBench** (Bai et al., 2023): the 16 English tasks with the reference prompts
  (``config/dataset2prompt.json``), generation lengths (``dataset2maxlen.json``), middle truncation of
  the prompt to ``longbench_max_length`` tokens, the chat template skipped for trec / triviaqa / samsum /
  lcc / repobench-p, the first line only for trec / triviaqa / samsum, the max over reference answers and
  the reference metrics, re-implemented here (``qa_f1_score``, ``rouge_score``, ...) because lm-eval's
  copy imports jieba, fuzzywuzzy and rouge. ``rouge_score`` is ROUGE-L as the ``rouge`` package
  (pltrdy, 1.0.1) computes it, which LongBench calls: sentences split at ".", words compared as *sets*
  (repeated words count once), summary-level union LCS, F with a 1e-8 guard. That is not
  ROUGE-L of Lin (2004) nor of Google's ``rouge_score``, but it is what published LongBench numbers
  use. Departures: the LCS is reconstructed iteratively (the package recurses and, through LongBench's
  bare ``except``, scores 0 for a sentence pair longer than Python's recursion limit), and samsum is not
  forced to a first token other than newline (LongBench passes ``min_length`` and stops at newline;
  here generation runs to the length limit and only the first non-empty line is scored, which differs
  only when the model's first line is empty). ``code_sim_score`` uses difflib's ratio, which is what
  fuzzywuzzy uses without python-Levenshtein. ``longbench`` is the unweighted mean over tasks.

All scores are reported on 0-100 (accuracy in percent), like RULER's. ``<metric>_stderr`` is lm-eval's
bootstrap/analytic standard error on the same scale.
"""

from __future__ import annotations

import csv
import json
import math
import re
import string
import tempfile
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

__all__ = [
    "LONGBENCH_TASKS",
    "HarnessDataError",
    "run_harness",
    "write_harness_results",
    "results_table",
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

FAMILIES = ("mmlu", "bbh", "longbench")
PREFIX = "lctw_"  # lm-eval task names are prefixed so they never clash with the built-in ones
MMLU_LETTERS = ("A", "B", "C", "D")
BBH_UNTIL = ["</s>", "Q:", "\n\n"]
BBH_MAX_GEN_TOKS = 128
DATA_EXTS = (".jsonl", ".json", ".parquet", ".csv")


class HarnessDataError(FileNotFoundError):
    """A task's local data is missing or not in the expected format."""


# --- LongBench metrics (THUDM/LongBench metrics.py, English tasks) ----------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction), num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token-level F1 of the normalised answer (bag of words), in [0, 1]."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The words of one LCS of x and y, reconstructed with the ``rouge`` package's tie-breaking."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F as ``rouge.Rouge().get_scores(...)["rouge-l"]["f"]`` (pltrdy 1.0.1), in [0, 1].

    Words are split on single spaces within "."-separated sentences and compared as sets; the overlap
    is the size of the union over reference sentences of the LCS words with every hypothesis sentence.
    An empty hypothesis or reference scores 0 (LongBench catches the package's ValueError).
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    llcs = 0
    for ref_s in ref:
        ref_words = ref_s.split(" ")
        before = len(union)
        for hyp_s in hyp_words:
            union |= set(_lcs_words(ref_words, hyp_s))
        llcs += len(union) - before
    r, p = llcs / m, llcs / n
    return 2.0 * (p * r) / (p + r + 1e-8)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """TREC: 1/k if the true class is among the k class names found in the prediction, else 0.

    Faithful to the reference, including two quirks: a matched name that is a substring of the true
    class is dropped while iterating over the same list (so the next element is skipped), and the
    difflib fallback for "no class found" never runs (the reference tests ``list != 0``), so that case
    scores 0.
    """
    matches = [c for c in all_classes if c in prediction]
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """passage_retrieval_en: the share of the numbers in the prediction that equal the gold paragraph id."""
    gold = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == gold for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """passage_count: the share of the numbers in the prediction that equal the gold count."""
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(ground_truth) for n in numbers) / len(numbers)


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """lcc / repobench-p: similarity of the first line that is not a comment or a code fence."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n") if not any(c in ln for c in ("`", "#", "//"))), "")
    return round(100 * SequenceMatcher(None, line, ground_truth).ratio()) / 100


# name: (prompt, max new tokens, metric, metric name)
_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_MQA = f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:"
LONGBENCH_TASKS: dict[str, tuple[str, int, Any, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, qa_f1_score, "qa_f1",
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
        "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:",
        128, qa_f1_score, "qa_f1",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, qa_f1_score, "qa_f1",
    ),
    "hotpotqa": (_MQA, 32, qa_f1_score, "qa_f1"),
    "2wikimqa": (_MQA, 32, qa_f1_score, "qa_f1"),
    "musique": (_MQA, 32, qa_f1_score, "qa_f1"),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, rouge_score, "rouge_l",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512, rouge_score, "rouge_l",
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
        512, rouge_score, "rouge_l",
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64, classification_score, "classification",
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32, qa_f1_score, "qa_f1",
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128, rouge_score, "rouge_l",
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32, count_score, "count",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ",
        32, retrieval_score, "retrieval",
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n", 64, code_sim_score, "code_sim"),
    "repobench-p": (
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, code_sim_score, "code_sim",
    ),
}
_LB_FIRST_LINE = {"trec", "triviaqa", "samsum"}
_LB_NO_CHAT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}


def _lb_base(task: str) -> str:
    return task[:-2] if task.endswith("_e") and task[:-2] in LONGBENCH_TASKS else task


def longbench_score(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None):
    """One sample's LongBench score in [0, 1]: the reference scorer's max over the gold answers."""
    base = _lb_base(task)
    metric = LONGBENCH_TASKS[base][2]
    if base in _LB_FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max([0.0, *(metric(prediction, gt, all_classes=all_classes or ()) for gt in answers)])


# --- lm-eval hooks (imported by the generated utils file next to the YAMLs) ---------------------------


def bbh_exact_match(prediction: str, target: str) -> float:
    """BBH exact match: the stripped generation equals the stripped target (case-sensitive)."""
    return float(prediction.strip() == target.strip())


def bbh_process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": bbh_exact_match(results[0], doc["target"])}


def longbench_process_results(doc: dict, results: list[str]) -> dict:
    task = doc["lctw_task"]
    name = LONGBENCH_TASKS[_lb_base(task)][3]
    return {name: longbench_score(task, results[0], doc["answers"], doc.get("all_classes"))}


# --- Local data: discovery, validation, normalisation -----------------------------------------------


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


def parse_bbh_prompt(text: str) -> tuple[str, list[dict]]:
    """An official BBH ``cot-prompts/<task>.txt`` -> (description, answer-only exemplars).

    The file is a description line, a ``-----`` separator and "Q: ...\\nA: Let's think step by step. ...
    So the answer is X." blocks; the answer-only exemplar keeps the question and X.
    """
    head, sep, body = text.partition("-----")
    if not sep:
        raise ValueError("no '-----' separator after the task description")
    shots = []
    for block in re.split(r"\n\s*\n(?=Q:)", body.strip()):
        q, a = block.split("\nA:", 1) if "\nA:" in block else (block, "")
        found = re.findall(r"So the answer is (.*?)\.?\s*$", a.strip(), flags=re.S)
        if not q.startswith("Q:") or not found:
            raise ValueError(f"cannot parse exemplar: {block[:80]!r}")
        shots.append({"input": q[2:].strip(), "target": found[-1].strip()})
    return head.strip(), shots


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


class _Builder:
    """Turns the requested task names into normalised JSONL files and lm-eval YAMLs in ``work``."""

    def __init__(self, data_dir: Path, work: Path, num_fewshot: int, tokenizer, longbench_max_length: int | None,
                 chat: bool):
        self.data_dir, self.work, self.k = data_dir, work, num_fewshot
        self.tokenizer, self.lb_max, self.chat = tokenizer, longbench_max_length, chat
        (work / f"{PREFIX}harness_utils.py").write_text(
            "from lctw.eval.harness import bbh_process_results, longbench_process_results  # noqa: F401\n"
        )

    def expand(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        """{family or task name as requested: [subtask names]}, checking that the data exists."""
        out: dict[str, list[str]] = {}
        for t in tasks:
            family, _, name = t.partition("_")
            if family not in FAMILIES:
                raise KeyError(f"unknown harness task {t!r}: use mmlu, bbh, longbench or <family>_<name>")
            folder = self.data_dir / family
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
                names = sorted(p.stem for p in folder.glob("*.jsonl") if _lb_base(p.stem) in LONGBENCH_TASKS)
            if not names:
                raise _missing(family, family, folder, "task files")
            out[t] = names
        return out

    def build(self, family: str, name: str) -> str:
        return getattr(self, f"_{family}")(name)

    def _mmlu(self, subject: str) -> str:
        folder = self.data_dir / "mmlu"
        test = _find(folder, f"{subject}_test")
        if test is None:
            raise _missing("mmlu", subject, folder, f"{subject}_test{{{','.join(DATA_EXTS)}}}")
        files = {"test": self._normalised(f"mmlu_{subject}_test", _mmlu_rows(test))}
        config: dict[str, Any] = {}
        if self.k:
            dev = _find(folder, f"{subject}_dev")
            if dev is None:
                raise _missing("mmlu", subject, folder, f"few-shot file {subject}_dev.* (num_fewshot={self.k})")
            files["dev"] = self._normalised(f"mmlu_{subject}_dev", _mmlu_rows(dev))
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
        folder = self.data_dir / "bbh"
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
        if self.k > len(shots):
            raise _missing("bbh", name, folder, f"{self.k} few-shot exemplars ({name}.txt or {name}_fewshot.jsonl; "
                                                f"found {len(shots)})")
        task = f"{PREFIX}bbh_{name}"
        config = {
            "task": task, "task_alias": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": self._normalised(f"bbh_{name}", rows)}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": self.k,
            "doc_to_text": "Q: {{input}}\nA:", "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": BBH_UNTIL, "do_sample": False, "max_gen_toks": BBH_MAX_GEN_TOKS},
            "process_results": f"!function {PREFIX}harness_utils.bbh_process_results",
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
        folder = self.data_dir / "longbench"
        if _lb_base(name) not in LONGBENCH_TASKS:
            raise KeyError(f"unknown LongBench task {name!r}; choose from {sorted(LONGBENCH_TASKS)} (or <task>_e)")
        path = folder / f"{name}.jsonl"
        if not path.exists():
            raise _missing("longbench", name, folder, f"{name}.jsonl")
        rows = _read_rows(path)
        _require(rows, path, ("context", "input", "answers"))
        prompt_format, max_gen, _, metric = LONGBENCH_TASKS[_lb_base(name)]
        docs = []
        for i, row in enumerate(rows):
            if isinstance(row["answers"], str) or not len(row["answers"]):
                raise HarnessDataError(f"{path}: row {i}: 'answers' must be a non-empty list of strings")
            prompt = self._longbench_prompt(prompt_format.format(context=row["context"], input=row["input"]),
                                            _lb_base(name))
            docs.append({"prompt": prompt, "answers": [str(a) for a in row["answers"]],
                         "all_classes": list(row.get("all_classes") or []), "lctw_task": name,
                         "length": row.get("length")})
        task = f"{PREFIX}longbench_{name}"
        _dump(self.work / f"{task}.yaml", {
            "task": task, "task_alias": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": self._normalised(f"longbench_{name}", docs)}},
            "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answers[0]}}",
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen},
            "process_results": f"!function {PREFIX}harness_utils.longbench_process_results",
            "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        })
        return task

    def _longbench_prompt(self, prompt: str, base: str) -> str:
        """Middle truncation to ``longbench_max_length`` tokens, then the chat wrapper (as LongBench's pred.py)."""
        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if self.lb_max is not None and len(ids) > self.lb_max:
            half = self.lb_max // 2
            prompt = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:],
                                                                                  skip_special_tokens=True)
        if self.chat and base not in _LB_NO_CHAT:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return prompt

    def _normalised(self, stem: str, rows: list[dict]) -> str:
        path = self.work / "data" / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, rows)
        return str(path.resolve())


# --- Runner -----------------------------------------------------------------------------------------


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lctw.eval.harness needs EleutherAI's lm-eval: pip install lm-eval") from e
    return lm_eval, HFLM, TaskManager


def _model_max_length(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 1,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    longbench_max_length: int | None = None,
    work_dir: str | None = None,
    log_samples: bool = False,
    seed: int = 1234,
) -> dict:
    """Evaluate an already-loaded causal LM on local MMLU / BBH / LongBench data with lm-eval.

    ``tasks`` takes families (``mmlu``, ``bbh``, ``longbench``: every task found under ``data_dir``) or
    single tasks (``mmlu_<subject>``, ``bbh_<task>``, ``longbench_<task>``). ``num_fewshot`` applies to
    MMLU and BBH (standard: 5 and 3); LongBench prompts carry their own examples. ``limit`` is lm-eval's
    (first n docs per task, or a fraction). ``apply_chat_template`` wraps MMLU/BBH prompts with lm-eval's
    chat rendering and LongBench prompts with the tokenizer's template (except the tasks LongBench runs
    raw). ``max_length`` is lm-eval's context window (default: the model's ``max_position_embeddings``);
    ``longbench_max_length`` is the prompt budget for middle truncation (default: that window minus 500,
    LongBench's convention, e.g. 3500 for a 4k model). ``work_dir`` keeps the generated YAMLs and JSONL
    (default: a temporary directory removed afterwards).

    Returns ``{"results": {task: {"score", <metric>, <metric>_stderr, "n", "family", "metric"}},
    "groups": {family or requested name: {"score", "n", "tasks"}}, "config": {...}}`` and, with
    ``log_samples``, ``"samples": {task: [{"doc", "prediction", ...}]}``. Scores are on 0-100.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise HarnessDataError(f"data_dir {data} does not exist")
    if num_fewshot < 0:
        raise ValueError("num_fewshot must be >= 0")
    window = max_length or _model_max_length(model)
    if longbench_max_length is None and window:
        longbench_max_length = max(window - 500, window // 2)

    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="lctw-harness-")
    work = Path(work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        builder = _Builder(data, work, num_fewshot, tokenizer, longbench_max_length, apply_chat_template)
        requested = builder.expand(tasks)
        names: dict[str, tuple[str, str]] = {}  # lm-eval task -> (family, short name)
        for req, subs in requested.items():
            family = req.partition("_")[0]
            for sub in subs:
                names.setdefault(builder.build(family, sub), (family, sub))

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=window)
        manager = TaskManager(include_path=str(work), include_defaults=False)
        # LongBench renders its own chat wrapper (per task), so it runs in a call without lm-eval's.
        groups = [[t for t, (f, _) in names.items() if f != "longbench"],
                  [t for t, (f, _) in names.items() if f == "longbench"]]
        results: dict[str, dict] = {}
        samples: dict[str, list] = {}
        for group, chat in zip(groups, (apply_chat_template, False), strict=True):
            if not group:
                continue
            out = lm_eval.simple_evaluate(
                model=lm, tasks=group, task_manager=manager, limit=limit, log_samples=log_samples,
                apply_chat_template=chat, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
            if out is None:  # non-zero ranks under torch.distributed
                continue
            for task in group:
                family, short = names[task]
                results[f"{family}_{short}"] = _task_metrics(out, task, family)
                if log_samples:
                    samples[f"{family}_{short}"] = [_sample(s, family) for s in out["samples"].get(task, [])]
    finally:
        if tmp is not None:
            tmp.cleanup()

    report: dict[str, Any] = {
        "results": results,
        "groups": {req: _group(req, [f"{req.partition('_')[0]}_{s}" for s in subs], results)
                   for req, subs in requested.items() if len(subs) > 1 or "_" not in req},
        "config": dict(tasks=list(tasks), data_dir=str(data), num_fewshot=num_fewshot, limit=limit,
                       batch_size=batch_size, apply_chat_template=apply_chat_template, max_length=window,
                       longbench_max_length=longbench_max_length, seed=seed,
                       lm_eval_version=getattr(lm_eval, "__version__", "unknown")),
    }
    if log_samples:
        report["samples"] = samples
    return report


def _sample(s: dict, family: str) -> dict:
    """One logged sample: the prompt exactly as the model saw it (before tokenisation), the prediction
    (the generation, or for MMLU the log-likelihood of each letter) and the per-sample metric."""
    args = s["arguments"][0]
    if family == "mmlu":
        prediction = [float(ll) for ll, _ in s["filtered_resps"]]
    else:
        prediction = s["filtered_resps"][0]
    metrics = {k: float(v) for k, v in s.items() if k in ("acc", "exact_match", *_lb_metric_names())}
    return {"doc": s["doc"], "prompt": args[0], "prediction": prediction, **metrics}


def _lb_metric_names() -> set[str]:
    return {v[3] for v in LONGBENCH_TASKS.values()}


def _task_metrics(out: dict, task: str, family: str) -> dict:
    raw = out["results"][task]
    metric = {"mmlu": "acc", "bbh": "exact_match"}.get(family)
    if metric is None:
        metric = next(m for m in _lb_metric_names() if f"{m},none" in raw)
    value = float(raw[f"{metric},none"]) * 100
    stderr = raw.get(f"{metric}_stderr,none")
    stderr = float(stderr) * 100 if isinstance(stderr, (int, float)) and not math.isnan(stderr) else None
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    return {"family": family, "metric": metric, "score": value, metric: value, f"{metric}_stderr": stderr,
            "n": int(n) if n is not None else None}


def _group(name: str, members: list[str], results: dict) -> dict:
    """MMLU: micro average over all questions; BBH and LongBench: mean over tasks."""
    rows = [results[m] for m in members if m in results]
    if name.startswith("mmlu"):
        total = sum(r["n"] for r in rows)
        score = sum(r["score"] * r["n"] for r in rows) / total if total else float("nan")
    else:
        score = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    return {"score": score, "n": sum(r["n"] or 0 for r in rows), "tasks": len(rows)}


def results_table(report: dict):
    """A pandas DataFrame: one row per task, then one per group (task column ``<group> (avg)``)."""
    import pandas as pd

    rows = [{"task": t, "family": r["family"], "metric": r["metric"], "score": r["score"],
             "stderr": r.get(f"{r['metric']}_stderr"), "n": r["n"]} for t, r in report["results"].items()]
    rows += [{"task": f"{g} (avg)", "family": g.partition("_")[0], "metric": "micro" if g.startswith("mmlu")
              else "mean", "score": v["score"], "stderr": None, "n": v["n"]} for g, v in report["groups"].items()]
    return pd.DataFrame(rows, columns=["task", "family", "metric", "score", "stderr", "n"])


def write_harness_results(results: dict, out_dir: str) -> str:
    """Write ``harness.csv`` (the table) and ``harness.json`` (everything) to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results)
    table.to_csv(out / "harness.csv", index=False)
    (out / "harness.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return table.to_string(index=False, float_format=lambda x: f"{x:.2f}", na_rep="-")
