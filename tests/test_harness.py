"""Tests for lctw.eval.harness: MMLU / BBH / LongBench through lm-eval on local hand-made items.

The model is a randomly initialised 2-layer Llama and the tokenizer a byte-level BPE trained here in
well under a second, so the scores themselves are near zero; what is checked is that the prompts lm-eval
builds are exactly the documented ones, that the reported scores are what the logged predictions give
under the reference metrics (and, for MMLU, what the model's own log-likelihoods give), the error
messages for missing data, and the metric functions against hand-worked cases.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="pip install lm-eval")

from lctw.eval import harness as H  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

DATA = Path(__file__).parent / "data" / "harness"
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer():
    from lctw.models import bpe_tokenizer

    corpus = [p.read_text(encoding="utf-8") for p in sorted(DATA.rglob("*")) if p.is_file()]
    fast = bpe_tokenizer(corpus * 5, 600)
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def report(model, tok):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return H.run_harness(model, tok, ["mmlu_astronomy", "bbh", "longbench"], str(DATA), num_fewshot=2,
                             log_samples=True)
    finally:
        torch.set_num_threads(threads)


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# --- End to end -------------------------------------------------------------------------------------


def test_structure_counts_and_ranges(report):
    expected = {"mmlu_astronomy": 4, "bbh_boolean_expressions": 5, "bbh_sports_understanding": 4,
                "longbench_hotpotqa": 3, "longbench_gov_report": 3, "longbench_trec": 3,
                "longbench_passage_retrieval_en": 3}
    assert {t: r["n"] for t, r in report["results"].items()} == expected
    metrics = {"mmlu": "acc", "bbh": "exact_match"}
    for task, r in report["results"].items():
        family = task.partition("_")[0]
        assert r["family"] == family
        expected_metric = metrics[family] if family in metrics else H.LONGBENCH_TASKS[task.partition("_")[2]].metric
        assert r["metric"] == expected_metric
        assert 0.0 <= r["score"] <= 100.0 and r["score"] == r[r["metric"]]
        assert len(report["samples"][task]) == r["n"]
    assert set(report["groups"]) == {"bbh", "longbench"}  # a single MMLU subject is not a group
    assert report["groups"]["bbh"]["tasks"] == 2 and report["groups"]["bbh"]["n"] == 9
    assert report["config"]["num_fewshot"] == 2 and report["config"]["max_length"] == 1024
    assert report["config"]["longbench_max_length"] == 524


def test_scores_are_the_logged_predictions_under_the_reference_metrics(report):
    for task, rows in report["samples"].items():
        family, _, name = task.partition("_")
        result = report["results"][task]
        if family == "bbh":
            per = [H.bbh_exact_match(s["prediction"], s["doc"]["target"]) for s in rows]
        elif family == "longbench":
            per = [H.longbench_score(name, s["prediction"], s["doc"]["answers"], s["doc"]["all_classes"])
                   for s in rows]
        else:
            per = [float(max(range(4), key=lambda i: s["prediction"][i]) == s["doc"]["answer"]) for s in rows]
        assert [s[result["metric"]] for s in rows] == pytest.approx(per)
        assert result["score"] == pytest.approx(100 * sum(per) / len(per))
    bbh = [report["results"][t]["score"] for t in ("bbh_boolean_expressions", "bbh_sports_understanding")]
    assert report["groups"]["bbh"]["score"] == pytest.approx(sum(bbh) / 2)


def test_mmlu_prompt_and_loglikelihoods_match_the_model(report, model, tok):
    """The 2-shot prompt is lm-eval's MMLU format with the first dev items, and the logged per-letter
    log-likelihoods are the model's own (recomputed here without lm-eval)."""
    torch.set_num_threads(1)
    dev = [json.loads(x) for x in (DATA / "mmlu" / "astronomy_dev.jsonl").read_text().splitlines()]

    def fmt(q):
        c = q["choices"]
        return f"{q['question']}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    shots = "".join(f"{fmt(q)} {q['answer']}\n\n" for q in dev[:2])
    header = "The following are multiple choice questions (with answers) about astronomy.\n\n"
    for s in report["samples"]["mmlu_astronomy"]:
        prompt = header + shots + fmt(s["doc"])
        assert s["prompt"] == prompt
        ctx = tok(prompt)["input_ids"]
        lls = []
        for letter in "ABCD":
            cont = tok(" " + letter)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            lls.append(sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        assert s["prediction"] == pytest.approx(lls, abs=1e-3)


def test_bbh_prompt_is_answer_only_few_shot(report):
    s = report["samples"]["bbh_boolean_expressions"][0]
    assert s["prompt"] == (
        "Evaluate the result of a random Boolean expression.\n\n"
        "Q: not ( ( not not True ) ) is\nA: False\n\n"
        "Q: True and False and not True and True is\nA: False\n\n"
        "Q: not ( True ) and ( True ) is\nA:"
    )
    s = report["samples"]["bbh_sports_understanding"][1]
    assert s["prompt"].startswith('Q: Is the following sentence plausible? "Cristiano Ronaldo headed')
    assert s["prompt"].endswith('"Serena Williams hit a home run in the ninth inning."\nA:')
    for rows in (report["samples"]["bbh_boolean_expressions"], report["samples"]["bbh_sports_understanding"]):
        for s in rows:  # generation stops at the stop strings, which are never part of the prediction
            assert "\n\n" not in s["prediction"] and "Q:" not in s["prediction"]


def test_longbench_prompt_is_the_reference_template(report):
    row = json.loads((DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0])
    prompt = H.LONGBENCH_TASKS["hotpotqa"].prompt.format(context=row["context"], input=row["input"])
    assert report["samples"]["longbench_hotpotqa"][0]["prompt"] == prompt
    assert prompt.endswith(f"Question: {row['input']}\nAnswer:")


def test_longbench_middle_truncation_and_chat_template(model, tok):
    torch.set_num_threads(1)
    out = H.run_harness(model, tok, ["longbench_hotpotqa", "longbench_trec"], str(DATA), limit=1,
                        longbench_max_length=24, apply_chat_template=True, log_samples=True)
    row = json.loads((DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0])
    full = tok(H.LONGBENCH_TASKS["hotpotqa"].prompt.format(**row), add_special_tokens=False)["input_ids"]
    kept = tok.decode(full[:12]) + tok.decode(full[-12:])
    hotpot = out["samples"]["longbench_hotpotqa"][0]["prompt"]
    assert hotpot == f"<s><|user|>\n{kept}</s>\n<|assistant|>\n"  # truncated in the middle, then wrapped
    trec = out["samples"]["longbench_trec"][0]["prompt"]
    assert trec.startswith("Please determine the") and "<|user|>" not in trec  # trec runs raw
    assert len(tok(trec, add_special_tokens=False)["input_ids"]) <= 24


def test_write_results(report, tmp_path):
    table = H.write_harness_results(report, str(tmp_path))
    assert "bbh_sports_understanding" in table and "longbench (avg)" in table
    assert _lines(tmp_path / "harness.csv") == 1 + len(report["results"]) + len(report["groups"])
    saved = json.loads((tmp_path / "harness.json").read_text())
    assert saved["results"]["mmlu_astronomy"]["n"] == 4


# --- Data errors (raised before any model call) ------------------------------------------------------


def test_missing_and_malformed_data_errors(model, tok, tmp_path):
    run = lambda tasks, **kw: H.run_harness(model, tok, tasks, str(tmp_path), **kw)  # noqa: E731
    with pytest.raises(H.HarnessDataError, match=r"no data folder under .*mmlu"):
        run(["mmlu"])
    shutil.copytree(DATA, tmp_path, dirs_exist_ok=True)
    with pytest.raises(H.HarnessDataError, match=r"'date_understanding'.*date_understanding\.json"):
        run(["bbh_date_understanding"])
    with pytest.raises(H.HarnessDataError, match=r"few-shot file high_school_mathematics_dev"):
        run(["mmlu"], num_fewshot=1)
    with pytest.raises(H.HarnessDataError, match=r"3 few-shot exemplars .*found 2"):
        run(["bbh_sports_understanding"], num_fewshot=3)
    (tmp_path / "longbench" / "qasper.jsonl").write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(H.HarnessDataError, match=r"qasper\.jsonl: row 0 lacks \['context'\]"):
        run(["longbench_qasper"])
    (tmp_path / "mmlu" / "bad_test.csv").write_text("q,a,b,c,d\n")
    with pytest.raises(H.HarnessDataError, match=r"bad_test\.csv: row 0 does not have 6 columns"):
        run(["mmlu_bad"])
    with pytest.raises(KeyError, match="unknown harness task"):
        run(["hellaswag"])
    with pytest.raises(H.HarnessDataError, match="does not exist"):
        H.run_harness(model, tok, ["mmlu"], str(tmp_path / "nowhere"))


def test_missing_lm_eval_names_the_install(monkeypatch, model, tok):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        H.run_harness(model, tok, ["mmlu"], str(DATA))


# --- Metrics, hand-worked ---------------------------------------------------------------------------


def test_qa_f1_hand_worked():
    # "the danube river" -> [danube, river] vs [danube]: P = 1/2, R = 1, F1 = 2/3
    assert H.qa_f1_score("The Danube river.", "Danube") == pytest.approx(2 / 3)
    assert H.qa_f1_score("An apple", "apple!") == 1.0
    assert H.qa_f1_score("Paris", "Lyon") == 0.0
    assert H.qa_f1_score("", "Lyon") == 0.0
    # bag of words: one shared "b" of pred [b, b, c] and gold [b, d]: P = 1/3, R = 1/2, F1 = 0.4
    assert H.qa_f1_score("b b c", "b d") == pytest.approx(0.4)


def test_rouge_l_hand_worked():
    # one sentence each; LCS "the cat on the mat" -> distinct words {the, cat, on, mat}: 4 of 5 each side
    assert H.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-7)
    # summary level: each reference sentence matches its own hypothesis sentence, whatever the order
    assert H.rouge_score("c d. a b", "a b. c d") == pytest.approx(1.0, abs=1e-7)
    # repeated words count once: hyp {a}, ref {a, b}: P = 1, R = 1/2
    assert H.rouge_score("a a a", "a b") == pytest.approx(2 / 3, abs=1e-7)
    assert H.rouge_score("", "a b") == 0.0 and H.rouge_score("...", "a b") == 0.0


def test_rouge_l_matches_the_rouge_package():
    rouge = pytest.importorskip("rouge", reason="pip install rouge (the package LongBench scores with)")
    pairs = [
        ("The agency found funding rose. Most states reported on time.", "Funding rose by ten percent. Most "
         "states met the deadline, two did not."),
        ("the the cat cat. sat on on the mat", "the cat lay on the mat. the mat was red"),
        ("Costs grew  faster than inflation . A new system", "Road costs grew faster than inflation. A new "
         "tracking system is recommended."),
    ]
    for hyp, ref in pairs:
        expected = rouge.Rouge().get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        assert H.rouge_score(hyp, ref) == pytest.approx(expected, abs=1e-9)


def test_other_longbench_metrics_hand_worked():
    classes = ["Animal", "Date", "Number of something"]
    assert H.classification_score("Date", "Date", all_classes=classes) == 1.0
    assert H.classification_score("Animal or Date", "Date", all_classes=classes) == 0.5
    assert H.classification_score("no idea", "Date", all_classes=classes) == 0.0
    assert H.retrieval_score("Paragraph 2, not 3", "Paragraph 2") == 0.5
    assert H.retrieval_score("none", "Paragraph 2") == 0.0
    assert H.count_score("There are 5 unique paragraphs out of 7", "5") == 0.5
    assert H.code_sim_score("\n# set x\nx = 1\ny = 2", "x = 1") == 1.0
    assert H.code_sim_score("abcd", "abce") == 0.75
    # trec / triviaqa / samsum score only the first non-empty line; the max is over the gold answers
    assert H.longbench_score("trec", "\nDate\nAnimal", ["Date"], classes) == 1.0
    assert H.longbench_score("hotpotqa", "Danube river", ["the Danube", "Danube river"]) == 1.0
    assert H.longbench_score("hotpotqa_e", "Danube", ["the Danube", "Danube river"]) == 1.0
    assert H.bbh_exact_match(" False", "False") == 1.0 and H.bbh_exact_match("false", "False") == 0.0


def test_parse_bbh_prompt():
    description, shots = H.parse_bbh_prompt((DATA / "bbh" / "boolean_expressions.txt").read_text())
    assert description == "Evaluate the result of a random Boolean expression."
    assert [s["target"] for s in shots] == ["False", "False", "True"]
    assert shots[2]["input"] == "not not ( not ( False ) ) is"
    with pytest.raises(ValueError, match="separator"):
        H.parse_bbh_prompt("Q: x\nA: y")
