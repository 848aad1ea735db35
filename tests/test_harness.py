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

from test_ruler import RULER_META_LLAMA3, named

from lctw.eval import harness as H  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

DATA = Path(__file__).parent / "data" / "harness"
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tokenizer(add_bos: bool = False):
    from lctw.models import bpe_tokenizer

    corpus = [p.read_text(encoding="utf-8") for p in sorted(DATA.rglob("*")) if p.is_file()]
    fast = bpe_tokenizer(corpus * 5, 600, add_bos=add_bos)
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The same vocabulary, adding BOS on encoding as Llama's tokenizer does (LongBench counts it)."""
    return _tokenizer(add_bos=True)


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
        # batch_size 16: the random model rarely stops, so all 9 BBH items run their 256 new tokens at once
        return H.run_harness(model, tok, ["mmlu_astronomy", "bbh", "longbench"], str(DATA), mmlu_fewshot=2,
                             batch_size=16, log_samples=True)
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
    config = report["config"]
    assert config["mmlu_fewshot"] == 2 and config["bbh_fewshot"] == 3 and config["bbh_profile"] == "bbh_fewshot"
    assert config["max_length"] == 1024 and config["longbench_max_length"] == 500  # model2maxlen-style for 1k
    assert config["longbench_chat_template"] is True  # auto: the tokenizer has a chat template


def test_scores_are_the_logged_predictions_under_the_reference_metrics(report):
    for task, rows in report["samples"].items():
        family, _, name = task.partition("_")
        result = report["results"][task]
        if family == "bbh":  # lm-eval's bbh_fewshot: exact match, nothing stripped
            per = [H.bbh_exact_match(s["prediction"], s["doc"]["target"]) for s in rows]
        elif family == "longbench":
            per = [H.longbench_score(name, s["prediction"], s["doc"]["answers"], s["doc"]["all_classes"])
                   for s in rows]
        else:
            per = [float(max(range(4), key=lambda i: s["prediction"][i]) == s["doc"]["answer"]) for s in rows]
        assert [s[result["metric"]] for s in rows] == pytest.approx(per)
        assert result["score"] == pytest.approx(100 * sum(per) / len(per))
    bbh = [report["results"][t] for t in ("bbh_boolean_expressions", "bbh_sports_understanding")]
    # weighted by task size, as lm-eval's bbh group (5 and 4 items)
    assert report["groups"]["bbh"]["score"] == pytest.approx((5 * bbh[0]["score"] + 4 * bbh[1]["score"]) / 9)
    lb = {t.partition("_")[2]: r["score"] for t, r in report["results"].items() if t.startswith("longbench")}
    # hotpotqa, gov_report, trec, passage_retrieval_en: four categories of one task each
    assert report["groups"]["longbench"]["score"] == pytest.approx(sum(lb.values()) / 4)
    assert set(report["groups"]["longbench"]["categories"]) == {"multi_doc_qa", "summarization", "few_shot",
                                                                 "synthetic"}


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
    """lm-eval's bbh_fewshot prompt, built from a file in the official cot-prompts format."""
    s = report["samples"]["bbh_boolean_expressions"][0]
    assert s["prompt"] == (
        "Evaluate the result of a random Boolean expression.\n\n"
        "Q: not ( ( not not True ) ) is\nA: False\n\n"
        "Q: True and False and not True and True is\nA: False\n\n"
        "Q: not not ( not ( False ) ) is\nA: True\n\n"
        "Q: not ( True ) and ( True ) is\nA:"
    )
    s = report["samples"]["bbh_sports_understanding"][1]
    assert s["prompt"].startswith('Q: Is the following sentence plausible? "Cristiano Ronaldo headed')
    assert s["prompt"].endswith('"Serena Williams hit a home run in the ninth inning."\nA:')
    for rows in (report["samples"]["bbh_boolean_expressions"], report["samples"]["bbh_sports_understanding"]):
        for s in rows:  # generation stops at lm-eval's stop strings, which are never part of the prediction
            assert "\n\n" not in s["prediction"] and "Q" not in s["prediction"]


def test_longbench_prompt_is_the_reference_template(report, tok):
    """The reference prompt, wrapped in the chat template (auto: the tokenizer has one)."""
    row = json.loads((DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0])
    prompt = H.LONGBENCH_TASKS["hotpotqa"].prompt.format(context=row["context"], input=row["input"])
    assert report["samples"]["longbench_hotpotqa"][0]["prompt"] == f"<s><|user|>\n{prompt}</s>\n<|assistant|>\n"
    assert prompt.endswith(f"Question: {row['input']}\nAnswer:")
    ref = json.loads((DATA / "longbench" / "trec.jsonl").read_text().splitlines()[0])
    trec = H.LONGBENCH_TASKS["trec"].prompt.format(context=ref["context"], input=ref["input"])
    assert report["samples"]["longbench_trec"][0]["prompt"] == trec  # few-shot tasks run raw


def test_longbench_middle_truncation_and_chat_template(model, tok):
    torch.set_num_threads(1)
    out = H.run_harness(model, tok, ["longbench_hotpotqa", "longbench_trec"], str(DATA), limit=1,
                        longbench_max_length=24, longbench_chat_template=True, log_samples=True)
    row = json.loads((DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0])
    full = tok(H.LONGBENCH_TASKS["hotpotqa"].prompt.format(**row))["input_ids"]
    kept = tok.decode(full[:12]) + tok.decode(full[-12:])
    hotpot = out["samples"]["longbench_hotpotqa"][0]["prompt"]
    assert hotpot == f"<s><|user|>\n{kept}</s>\n<|assistant|>\n"  # truncated in the middle, then wrapped
    trec = out["samples"]["longbench_trec"][0]["prompt"]
    assert trec.startswith("Please determine the") and "<|user|>" not in trec  # trec runs raw
    assert len(tok(trec, add_special_tokens=False)["input_ids"]) <= 24


def _long_gov_report(tmp_path: Path) -> Path:
    (tmp_path / "longbench").mkdir()
    context = " ".join(["The agency reviewed the water program and found that funding rose."] * 120)
    row = {"input": "", "context": context, "answers": ["Funding rose."], "all_classes": None, "length": 1300}
    (tmp_path / "longbench" / "gov_report.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path


def test_longbench_long_prompt_keeps_bos_and_instruction(model, bos_tok, tmp_path, monkeypatch):
    """A gov_report prompt far beyond the budget reaches the model as pred.py builds it: BOS, the first
    instruction tokens and the closing instruction kept, the middle cut, nothing cut again afterwards
    (lm-eval cut such prompts from the left to window - 512 tokens, losing BOS and the instruction)."""
    torch.set_num_threads(1)
    seen = []
    generate = model.generate
    # what reaches the model is recorded; one new token is enough for that (the random model never stops)
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist())
                        or generate(**{**kw, "max_new_tokens": 1}))
    out = H.run_harness(model, bos_tok, ["longbench_gov_report"], str(_long_gov_report(tmp_path)),
                        longbench_chat_template=False, log_samples=True)
    budget = out["config"]["longbench_max_length"]
    assert budget == 500  # 1024 positions: 1 * 1000 - 500
    row = json.loads((tmp_path / "longbench" / "gov_report.jsonl").read_text())
    full = bos_tok(H.LONGBENCH_TASKS["gov_report"].prompt.format(**row))["input_ids"]
    assert full[0] == bos_tok.bos_token_id and len(full) > 2 * budget
    (ids,) = seen
    assert ids[:20] == full[:20]  # BOS and "You are given a report by a government agency. ..."
    assert bos_tok.decode(ids[:30]).startswith("<s>You are given a report by a government agency.")
    assert ids[-10:] == full[-10:]  # "... Now, write a one-page summary of the report.\n\nSummary:"
    assert abs(len(ids) - budget) <= 3  # re-tokenising the joined halves may merge a token at the seam
    assert out["samples"]["longbench_gov_report"][0]["prompt_tokens"] == len(ids)


def test_longbench_bos_kept_for_plain_prompts_next_to_chat_ones(model, bos_tok):
    """trec runs raw and hotpotqa chat-wrapped: each is encoded on its own, so both start with one BOS."""
    torch.set_num_threads(1)
    out = H.run_harness(model, bos_tok, ["longbench_trec", "longbench_hotpotqa"], str(DATA), limit=2,
                        batch_size=2, longbench_chat_template=True, log_samples=True)
    for task in ("longbench_trec", "longbench_hotpotqa"):
        for s in out["samples"][task]:
            _, ids = H.longbench_prompt(bos_tok, task.partition("_")[2], s["doc"], 500, True)
            assert ids[0] == bos_tok.bos_token_id and bos_tok.bos_token_id not in ids[1:]


def test_samsum_generation_rule(model, tok):
    """samsum as pred.py: the first new token may not be a newline (nor EOS), a newline ends generation.
    The model's head is replaced by one that always prefers the newline, then the token "len", so the
    rule alone decides the output."""
    import copy

    torch.set_num_threads(1)
    biased = copy.deepcopy(model)
    newline, other = tok.encode("\n", add_special_tokens=False)[-1], tok.convert_tokens_to_ids("len")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[newline], head.bias[other] = 10.0, 5.0
    biased.lm_head = head
    row = {"context": "Dialogue: A: hi\nSummary: A greets.", "input": "Dialogue: B: bye\nSummary:",
           "answers": ["B leaves."], "all_classes": None}
    _, (sample,) = H.run_longbench_task(biased, tok, "samsum", [row], 500, template=False)
    assert sample["prediction"] == "len\n"  # the newline is kept in the text, as in pred.py
    _, (sample,) = H.run_longbench_task(biased, tok, "trec", [row], 500, template=False)
    assert sample["prediction"] == "\n" * 64  # without the rule: newlines up to trec's 64 new tokens


def test_longbench_e_is_a_separate_benchmark(model, tok, tmp_path):
    torch.set_num_threads(1)
    shutil.copytree(DATA / "longbench", tmp_path / "longbench")
    rows = [json.loads(x) for x in (DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()]
    for row, length in zip(rows, (1000, 5000, 9000), strict=True):
        row["length"] = length
    (tmp_path / "longbench" / "hotpotqa_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "hotpotqa_e" not in H.readers.expand_tasks(tmp_path, ["longbench"])["longbench"]
    out = H.run_harness(model, tok, ["longbench_e"], str(tmp_path))
    assert list(out["results"]) == ["longbench_hotpotqa_e"] and set(out["groups"]) == {"longbench_e"}
    r = out["results"]["longbench_hotpotqa_e"]
    assert set(r["by_length"]) == {"0-4k", "4-8k", "8k+"}
    assert sum(r["by_length"].values()) / 3 == pytest.approx(r["score"])  # one row per bucket


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
    (tmp_path / "mmlu" / "high_school_mathematics_dev.csv").unlink()
    with pytest.raises(H.HarnessDataError, match=r"few-shot file high_school_mathematics_dev"):
        run(["mmlu"], mmlu_fewshot=1)
    (tmp_path / "bbh" / "sports_understanding_fewshot.jsonl").write_text('{"input": "q", "target": "yes"}\n')
    with pytest.raises(H.HarnessDataError, match=r"3 few-shot exemplars .*found 1"):
        run(["bbh_sports_understanding"])
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
    out = H.run_harness(model, tok, ["longbench_trec"], str(DATA), limit=1)  # LongBench does not need it
    assert out["results"]["longbench_trec"]["n"] == 1


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
    assert H.longbench_score("samsum", "\nB leaves.\nA stays.", ["B leaves."]) == pytest.approx(1.0, abs=1e-7)


def test_longbench_prompts_are_byte_identical_to_the_official_config():
    """SHA-256 of the 16 English prompts of THUDM/LongBench ``LongBench/config/dataset2prompt.json``,
    concatenated in task-name order (typos included: narrativeqa's "asconcisely"), and its generation
    lengths (``dataset2maxlen.json``)."""
    import hashlib

    blob = "".join(H.LONGBENCH_TASKS[t].prompt for t in sorted(H.LONGBENCH_TASKS))
    assert hashlib.sha256(blob.encode()).hexdigest() == (
        "f302e88f3731689c786d8b501a014ad789d8f4bd296b3721ce669531cbdd0d41")
    assert "asconcisely" in H.LONGBENCH_TASKS["narrativeqa"].prompt
    assert {t: spec.max_new_tokens for t, spec in H.LONGBENCH_TASKS.items()} == {
        "2wikimqa": 32, "gov_report": 512, "hotpotqa": 32, "lcc": 64, "multi_news": 512, "multifieldqa_en": 64,
        "musique": 32, "narrativeqa": 128, "passage_count": 32, "passage_retrieval_en": 32, "qasper": 128,
        "qmsum": 512, "repobench-p": 64, "samsum": 128, "trec": 64, "triviaqa": 32}


# LongBench README (THUDM/LongBench, LongBench/README.md), Llama2-7B-chat-4k, English tasks
README_LLAMA2 = {"narrativeqa": 18.7, "qasper": 19.2, "multifieldqa_en": 36.8, "hotpotqa": 25.4, "2wikimqa": 32.8,
                 "musique": 9.4, "gov_report": 27.3, "qmsum": 20.8, "multi_news": 25.8, "trec": 61.5,
                 "triviaqa": 77.8, "samsum": 40.7, "passage_count": 2.1, "passage_retrieval_en": 9.8,
                 "lcc": 52.4, "repobench-p": 43.8}
README_LLAMA2_CATEGORIES = {"single_doc_qa": 24.9, "multi_doc_qa": 22.6, "summarization": 24.7, "few_shot": 60.0,
                            "code": 48.1, "synthetic": 5.9}  # its leaderboard row; "Avg" 31.0


def test_longbench_average_is_the_mean_of_category_means():
    out = H.longbench_average(README_LLAMA2)
    average = out.pop("average")
    # the README rounds categories from unrounded task scores: within 0.1 of the rounded task means
    assert out == pytest.approx(README_LLAMA2_CATEGORIES, abs=0.1)
    assert round(average, 1) == 31.0
    assert round(sum(README_LLAMA2.values()) / 16, 1) == 31.5  # the mean over tasks is not the README's Avg
    assert H.longbench_average({"hotpotqa_e": 30.0, "musique_e": 10.0, "trec_e": 60.0})["average"] == 40.0


@pytest.mark.parametrize("profile", [{}, H.tasks.BBH_ZEROSHOT_MATCH])
def test_bbh_exact_match_is_lm_evals(profile):
    """lm-eval's own exact_match on the pairs a generation produces: leading/trailing spaces, case, the
    final period and quotes (removed only by the zero-shot options)."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    pairs = [(" False", "False"), ("False", "False"), ("False ", "False"), ("false", "False"), (" (A)", "(A)"),
             ("(A).", "(A)"), ('"yes"', "yes"), ("valid\n", "valid"), ("1, 2", "12"), ("] )", "] )")]
    for pred, target in pairs:
        expected = exact_match_hf_evaluate([pred], [target], **profile)["exact_match"]
        assert H.bbh_exact_match(pred, target, **profile) == expected, (pred, target)
    assert H.bbh_exact_match(" False", "False") == 0.0  # lm-eval's bbh_fewshot: the leading space counts
    assert H.bbh_exact_match("false.", "False", **H.tasks.BBH_ZEROSHOT_MATCH) == 1.0


def test_parse_bbh_prompt_official_format_as_lm_eval():
    """The fixture is in the official cot-prompts format (canary line, '-----', description, CoT
    exemplars); parsed, it gives the description and exemplars of lm-eval's own bbh_fewshot YAML."""
    import lm_eval
    import yaml

    text = (DATA / "bbh" / "boolean_expressions.txt").read_text()
    assert text.splitlines()[1] == "-----"
    description, shots = H.parse_bbh_prompt(text)
    stock = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "fewshot" / "boolean_expressions.yaml"
    reference = yaml.safe_load(stock.read_text())
    assert description + "\n\n" == reference["description"]
    assert shots == reference["fewshot_config"]["samples"]
    with pytest.raises(ValueError, match="-----"):
        H.parse_bbh_prompt("Q: x\nA: y")
    with pytest.raises(ValueError, match="cannot parse exemplar"):
        H.parse_bbh_prompt("canary\n-----\nA task.\n\nQ: x\nA: no answer here")


def test_code_sim_is_fuzzywuzzy_without_levenshtein():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz", reason="pip install fuzzywuzzy (LongBench's code_sim package)")
    if fuzz.SequenceMatcher.__module__ != "difflib":
        pytest.skip("python-Levenshtein is installed: fuzzywuzzy no longer computes LongBench's ratio")
    pairs = [("x = 1", "x = 1"), ("abcd", "abce"), ("", "x"), ("return self.value", "return value"),
             ("for i in range(n):", "for j in range(m):"), ("a" * 300 + "b", "a" * 250 + "c")]
    for pred, gold in pairs:
        assert H.code_sim_score(pred, gold) == fuzz.ratio(pred, gold) / 100, (pred, gold)


def test_bbh_zero_shot_is_lm_evals_bbh_zeroshot(model, tok):
    """k = 0: description + "Q: ...\nA:", lm-eval's zero-shot stop strings, and the score on its
    flexible-extract filter with the case-insensitive match (strict-match reported beside it)."""
    torch.set_num_threads(1)
    out = H.run_harness(model, tok, ["bbh_boolean_expressions"], str(DATA), bbh_fewshot=0, limit=2, batch_size=2,
                        log_samples=True)
    assert out["config"]["bbh_profile"] == "bbh_zeroshot"
    r = out["results"]["bbh_boolean_expressions"]
    assert "exact_match_strict" in r
    rows = out["samples"]["bbh_boolean_expressions"]
    assert {s["filter"] for s in rows} == {"strict-match", "flexible-extract"}
    for s in rows:
        assert s["prompt"] == f"Evaluate the result of a random Boolean expression.\n\nQ: {s['doc']['input']}\nA:"
        assert s["exact_match"] == H.bbh_exact_match(s["prediction"], s["doc"]["target"], **H.tasks.BBH_ZEROSHOT_MATCH)
    flexible = [s["exact_match"] for s in rows if s["filter"] == "flexible-extract"]
    assert r["score"] == pytest.approx(100 * sum(flexible) / len(flexible))


def test_harness_config_few_shot_settings():
    from lctw.eval.suite import Harness

    h = Harness(tasks=["mmlu", "bbh"], data_dir=str(DATA))
    assert (h.mmlu_fewshot, h.bbh_fewshot, h.lb_max, h.lb_chat) == (5, 3, None, "auto")
    h = Harness(tasks=["bbh"], data_dir=str(DATA), mmlu={"num_fewshot": 0}, bbh={"num_fewshot": 0})
    assert (h.mmlu_fewshot, h.bbh_fewshot) == (0, 0)
    with pytest.raises(ValueError, match=r"bbh: num_fewshot=5 is out of range: allowed 0-3 .*3 exemplars"):
        Harness(tasks=["bbh"], data_dir=str(DATA), bbh={"num_fewshot": 5})
    with pytest.raises(ValueError, match=r"mmlu: unknown options \['k'\]"):
        Harness(tasks=["mmlu"], data_dir=str(DATA), mmlu={"k": 5})
    with pytest.raises(ValueError, match=r"longbench: chat_template='yes' is not allowed"):
        Harness(tasks=["longbench"], data_dir=str(DATA), longbench={"chat_template": "yes"})


def test_longbench_budget_is_model2maxlen():
    assert [H.tasks.longbench_budget(w) for w in (4096, 8192, 16384, 32768)] == [3500, 7500, 15500, 31500]
    with pytest.raises(ValueError, match="eval.longbench.max_length"):
        H.tasks.longbench_budget(256)



# --- Which chat wrapper LongBench's prompts get (issue 19) -------------------------------------------

# THUDM/LongBench pred.py, build_chat's string for llama2 (its only Llama model, llama2-7b-chat-4k =
# meta-llama/Llama-2-7b-chat-hf), written out by hand: no spaces inside the tags, unlike RULER's meta-chat.
LONGBENCH_LLAMA2 = "[INST]{}[/INST]"
# LongBench v1 names no Llama 3 model: Llama 3's own one-turn format without a system block, RULER's.
LLAMA3_TURN = RULER_META_LLAMA3.replace("{task_template}", "{}")
# pred.py: `if dataset not in ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]: build_chat(...)`
# (lsht is Chinese, not among the 16 English tasks)
NEVER_WRAPPED = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}


def _named_tokenizer(name: str, llama3: bool = False):
    """The test vocabulary (BOS added on encoding, as Llama's) under a hub name (:func:`test_ruler.named`)."""
    return named(_tokenizer(add_bos=True), name, llama3)


def _tiny_model(tokenizer, name: str = ""):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config._name_or_path = name
    return LlamaForCausalLM(config).eval()


def _hotpotqa_prompt() -> tuple[dict, str]:
    row = json.loads((DATA / "longbench" / "hotpotqa.jsonl").read_text().splitlines()[0])
    return row, H.LONGBENCH_TASKS["hotpotqa"].prompt.format(context=row["context"], input=row["input"])


def test_longbench_templates_are_build_chats_strings(bos_tok):
    """Each template gives exactly its string around a chat task's prompt, and BOS once: added by the
    tokenizer to a reference string (pred.py encodes the wrapped prompt with tokenizer(prompt)), written
    as text by the tokenizer's template and by Llama 3's format."""
    from lctw.eval.ruler.templates import REFERENCE_TEMPLATES

    row, prompt = _hotpotqa_prompt()
    expected = {"base": prompt, False: prompt, "meta-chat": LONGBENCH_LLAMA2.format(prompt),
                "meta-llama3": LLAMA3_TURN.format(prompt), "tokenizer": f"<s><|user|>\n{prompt}</s>\n<|assistant|>\n",
                True: f"<s><|user|>\n{prompt}</s>\n<|assistant|>\n"}
    for template, text in expected.items():
        assert H.longbench_prompt(bos_tok, "hotpotqa", row, 10**6, template)[0] == text, template
    bos = bos_tok.bos_token_id
    for template in ("base", "meta-chat"):
        text, ids = H.longbench_prompt(bos_tok, "hotpotqa", row, 10**6, template)
        assert ids == [bos, *bos_tok(text, add_special_tokens=False)["input_ids"]]
    _, ids = H.longbench_prompt(bos_tok, "hotpotqa", row, 10**6, "tokenizer")
    assert ids[0] == bos and ids.count(bos) == 1
    llama3 = _named_tokenizer("meta-llama/Meta-Llama-3.1-8B-Instruct", llama3=True)
    text, ids = H.longbench_prompt(llama3, "hotpotqa", row, 10**6, "meta-llama3")
    assert text == LLAMA3_TURN.format(prompt) and ids == llama3(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1
    # the Llama 3 string is RULER's; LongBench has none of its own
    assert H.LONGBENCH_TEMPLATES.templates["meta-llama3"] == REFERENCE_TEMPLATES["meta-llama3"].replace(
        "{task_template}", "{prompt}")
    with pytest.raises(ValueError, match=r"unknown LongBench template 'llama2'"):
        H.longbench_prompt(bos_tok, "hotpotqa", row, 10**6, "llama2")


def test_longbench_tasks_pred_py_never_wraps_stay_plain(bos_tok):
    assert {name for name, spec in H.LONGBENCH_TASKS.items() if not spec.chat} == NEVER_WRAPPED
    row = {"context": "Some context.", "input": "Some input."}
    for task in NEVER_WRAPPED:
        plain = H.LONGBENCH_TASKS[task].prompt.format(**row)
        for template in ("meta-chat", "meta-llama3", "tokenizer", True):
            text, ids = H.longbench_prompt(bos_tok, task, row, 10**6, template)
            assert text == plain and ids == bos_tok(plain)["input_ids"], (task, template)


@pytest.mark.parametrize("name, llama3, template", [
    ("meta-llama/Llama-2-7b-chat-hf", False, "meta-chat"),  # LongBench's llama2-7b-chat-4k
    ("/models/Llama-2-13b-chat-hf/", False, "meta-chat"),
    ("meta-llama/Llama-2-7b-hf", False, "base"),
    ("meta-llama/Meta-Llama-3-8B", True, "base"),  # its tokenizer ships a template; base models run plain
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", True, "meta-llama3"),  # not the tokenizer's date block
    ("HuggingFaceTB/SmolLM2-135M-Instruct", False, "tokenizer"),  # a model LongBench does not name
])
def test_longbench_auto_picks_per_model_name(name, llama3, template):
    """auto: by the model's name, then the tokenizer's; other models: the tokenizer's template if any."""
    from types import SimpleNamespace

    tok = _named_tokenizer(name, llama3)
    assert H.resolve_longbench_template("auto", tok)[0] == template
    unnamed = _named_tokenizer("", llama3)
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=name))
    assert H.resolve_longbench_template("auto", unnamed, model)[0] == template
    unnamed.chat_template = None
    assert H.resolve_longbench_template("auto", unnamed)[0] == "base"  # no name, no template: plain


def test_longbench_records_the_template_that_ran(tmp_path, capsys):
    """End to end: an instruct Llama 3.1 gets Llama 3's format, not its tokenizer's date block; a Llama 2
    chat model (named by its config) LongBench's [INST]...[/INST]; trec runs plain either way. The
    template, why, and the prompt format are in the results, harness.json and the printed line."""
    torch.set_num_threads(1)
    row, prompt = _hotpotqa_prompt()
    tok = _named_tokenizer("meta-llama/Meta-Llama-3.1-8B-Instruct", llama3=True)
    out = H.run_harness(_tiny_model(tok), tok, ["longbench_hotpotqa", "longbench_trec"], str(DATA), limit=1,
                        log_samples=True)
    config = out["config"]
    assert (config["longbench_template"], config["longbench_chat_template"],
            config["longbench_chat_template_setting"]) == ("meta-llama3", True, "auto")
    assert config["longbench_template_reason"].startswith("Meta-Llama-3.1-8B-Instruct, an instruct Llama 3")
    assert config["longbench_prompt_format"].startswith("Llama 3's chat format without a system block")
    hotpot = out["samples"]["longbench_hotpotqa"][0]["prompt"]
    assert hotpot == LLAMA3_TURN.format(prompt) and "Cutting Knowledge Date" not in hotpot
    assert out["results"]["longbench_hotpotqa"]["template"] == "meta-llama3"
    assert out["results"]["longbench_trec"]["template"] == "base"
    assert "<|start_header_id|>" not in out["samples"]["longbench_trec"][0]["prompt"]
    H.write_harness_results(out, str(tmp_path))
    assert json.loads((tmp_path / "harness.json").read_text())["config"]["longbench_template"] == "meta-llama3"
    printed = capsys.readouterr().out
    assert "LongBench prompt format: Llama 3's chat format" in printed
    assert "never wrapped, as in pred.py: trec, triviaqa, samsum, lcc, repobench-p" in printed

    llama2 = _named_tokenizer("")
    out = H.run_harness(_tiny_model(llama2, "meta-llama/Llama-2-7b-chat-hf"), llama2, ["longbench_hotpotqa"],
                        str(DATA), limit=1, log_samples=True)
    assert out["samples"]["longbench_hotpotqa"][0]["prompt"] == LONGBENCH_LLAMA2.format(prompt)
    assert out["config"]["longbench_template_reason"] == "LongBench's template for Llama-2-7b-chat-hf"
    assert out["config"]["longbench_prompt_format"] == ("LongBench's meta-chat template (THUDM/LongBench "
                                                         "pred.py, build_chat's llama2 string)")


def test_longbench_chat_template_values_are_checked():
    from omegaconf import OmegaConf

    from lctw.config.types import build
    from lctw.errors import ConfigError
    from lctw.eval.suite import Harness

    for value in ("auto", True, False, "tokenizer", "base", "meta-chat", "meta-llama3"):
        assert Harness(tasks=["longbench"], data_dir=str(DATA), longbench={"chat_template": value}).lb_chat == value
    node = OmegaConf.create({"_target_": "lctw.eval.suite.Harness", "tasks": ["longbench"], "data_dir": str(DATA),
                             "longbench": {"chat_template": "llama2"}})
    with pytest.raises(ConfigError, match=r"^eval\.longbench: chat_template='llama2' is not allowed: choose auto, "
                                          r"true .*false .*tokenizer .*\['base', 'meta-chat', 'meta-llama3'\]"):
        build(node, "eval")
    with pytest.raises(ValueError, match=r"longbench: chat_template=1 is not allowed"):
        Harness(tasks=["longbench"], data_dir=str(DATA), longbench={"chat_template": 1})
    node = OmegaConf.create({"_target_": "lctw.eval.suite.Ruler", "chat_template": "llama3"})
    with pytest.raises(ConfigError, match=r"^eval\.chat_template='llama3' is not allowed: choose one of "
                                          r"\['auto', True, False, 'tokenizer', 'base', 'meta-chat', 'meta-llama3'\]"):
        build(node, "eval")
    tok = _named_tokenizer("")
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"longbench.chat_template=True asks for the tokenizer's chat template, but"):
        H.run_harness(_tiny_model(tok), tok, ["longbench_hotpotqa"], str(DATA), longbench_chat_template=True)


OFFICIAL_BBH = Path(__file__).parent / "data" / "bbh_cot_prompts"


def _task_requests(include_path: Path, names: list[str]) -> dict[str, list[tuple]]:
    """{task: [(context, generation kwargs) per doc]}: what lm-eval would send to the model."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(names, TaskManager(include_path=str(include_path), include_defaults=False))
    out = {}
    for name, task in tasks.items():
        task.build_all_requests(rank=0, world_size=1)
        out[name] = [tuple(inst.arguments) for inst in task.instances]
    return out


def test_all_27_official_bbh_prompt_files_give_lm_evals_stock_requests(tmp_path):
    """Issue 19: every official cot-prompts file (tests/data/bbh_cot_prompts, rebuilt from lm-eval's own
    cot_fewshot YAMLs by its reconstruct.py) gives the requests of lm-eval's stock bbh_fewshot (k=3) and
    bbh_zeroshot (k=0) tasks, run on the same rows: the same prompt, stop strings and generation length.
    snarks' two-paragraph description was refused before ("cannot parse exemplar"), so eval=bbh aborted.
    The stock YAMLs are copied with only their dataset pointed at the local rows; they leave max_gen_toks
    to HFLM's default of 256, which lctw writes out."""
    import lm_eval

    from lctw.eval.harness.lmeval import TaskWriter
    from lctw.eval.harness.readers import expand_tasks

    stock_dir = Path(lm_eval.__file__).parent / "tasks" / "bbh"
    data, stock = tmp_path / "data" / "bbh", tmp_path / "stock"
    data.mkdir(parents=True)
    stock.mkdir()
    tasks = sorted(p.stem for p in OFFICIAL_BBH.glob("*.txt"))
    assert len(tasks) == 27 and tasks == sorted(p.stem for p in (stock_dir / "fewshot").glob("[!_]*.yaml"))
    shutil.copy(stock_dir / "zeroshot" / "utils.py", stock)  # the zero-shot answer filters' module
    rows = [{"input": "Which option is right?\nOptions:\n(A) one\n(B) two", "target": "(A)"},
            {"input": "not ( True ) and ( True ) is", "target": "False"}]
    for task in tasks:
        shutil.copy(OFFICIAL_BBH / f"{task}.txt", data)
        rows_file = data / f"{task}.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for profile in ("fewshot", "zeroshot"):
            local = f"\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(rows_file))}\n"
            (stock / f"{profile}_{task}.yaml").write_text(
                (stock_dir / profile / f"{task}.yaml").read_text(encoding="utf-8") + local, encoding="utf-8")
    for profile in ("fewshot", "zeroshot"):
        shutil.copy(stock_dir / profile / f"_{profile}_template_yaml", stock)
    reference = _task_requests(stock, [f"bbh_{p}_{t}" for p in ("fewshot", "zeroshot") for t in tasks])

    assert expand_tasks(tmp_path / "data", ["bbh"]) == {"bbh": tasks}
    for k, profile in ((3, "fewshot"), (0, "zeroshot")):
        work = tmp_path / f"work{k}"
        work.mkdir()
        writer = TaskWriter(tmp_path / "data", work, mmlu_fewshot=0, bbh_fewshot=k)
        ours = _task_requests(work, [writer.write("bbh", t) for t in tasks])
        for task in tasks:
            expected = [(ctx, {"max_gen_toks": 256, **kw}) for ctx, kw in reference[f"bbh_{profile}_{task}"]]
            assert ours[f"lctw_bbh_{task}"] == expected, (profile, task)
    snarks = ours["lctw_bbh_snarks"][0][0]
    assert snarks.startswith("Determine which of two sentences is sarcastic.\n\nAccording to Cambridge")


def test_parse_bbh_prompt_keeps_a_multi_paragraph_description():
    description, shots = H.parse_bbh_prompt((OFFICIAL_BBH / "snarks.txt").read_text(encoding="utf-8"))
    assert description.split("\n\n")[0] == "Determine which of two sentences is sarcastic."
    assert description.count("\n\n") == 1 and [s["target"] for s in shots] == ["(A)", "(B)", "(A)"]
    with pytest.raises(ValueError, match="no task description"):
        H.parse_bbh_prompt("canary\n-----\nQ: x\nA: Let's think step by step. So the answer is y.")


@pytest.mark.integration
def test_eval_harness_option_on_the_trained_model(trained_run, tmp_path):
    """eval=harness: MMLU-format items from local files through lm-eval, written and returned as metrics."""
    pytest.importorskip("lm_eval", reason="pip install lm-eval")
    import pandas as pd
    from conftest import ROOT, compose
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_run
    cfg = compose(["eval=harness", "eval.tasks=[mmlu_astronomy]", f"eval.data_dir={ROOT}/tests/data/harness"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    from transformers import AutoTokenizer

    metrics = instantiate(cfg.eval)(model, AutoTokenizer.from_pretrained(run_dir / "hf"), tmp_path)
    assert 0 <= metrics["eval/harness/mmlu_astronomy"] <= 100
    table = pd.read_csv(tmp_path / "harness.csv")
    assert "mmlu_astronomy" in set(table["task"])
