"""The harness's task families and the LongBench task table: what each task asks and how it is scored.

These are the protocols that published numbers use, so they live apart from the code that reads data
(``readers``) and the code that runs them (``lmeval``, ``longbench``); changing anything here moves scores.
Each family's default is the *official* profile, the one its reference computes:

* **MMLU** (Hendrycks et al.): lm-eval's ``mmlu`` (prompt, description, loglikelihood of " A".." D",
  ``acc``), 5-shot from the first items of the subject's dev file by default. ``mmlu`` is the micro
  average over all questions (lm-eval's group score, weighted by subject size).
* **BBH** (Suzgun et al.): answer-only prompting, ``Q: {input}\nA:`` after the task's description.
  k = 3 (default) is lm-eval's ``bbh_fewshot``: the three exemplars of the official ``cot-prompts``
  file with their chain of thought cut ("Q: ...\nA: " + the answer), greedy until "Q" or a blank line
  (``BBH_FEWSHOT_UNTIL``), 256 new tokens, exact match without any normalisation (a generation " False"
  does not match "False"). k = 0 is lm-eval's ``bbh_zeroshot``: the same prompt without exemplars, until
  "Q:" (``BBH_ZEROSHOT_UNTIL``), case-insensitive exact match after lm-eval's ignore regexes, scored on
  lm-eval's "flexible-extract" answer filter of the task (its "strict-match" is reported beside it).
  ``bbh`` is the average weighted by task size, as lm-eval's group.
* **LongBench** (Bai et al., 2023; THUDM/LongBench ``pred.py`` / ``eval.py``): the 16 English tasks with
  the reference prompts (``config/dataset2prompt.json``, byte for byte, typos included), generation
  lengths (``dataset2maxlen.json``), prompts longer than the budget (``model2maxlen.json``: 3500 / 7500 /
  15500 / 31500 tokens for 4k / 8k / 16k / 32k windows) cut in the middle, the chat wrapper skipped for
  trec / triviaqa / samsum / lcc / repobench-p, samsum's generation rule (the first new token may not be
  EOS or a newline, generation stops at a newline), the first line only for trec / triviaqa / samsum,
  the max over reference answers and the reference metrics (``lctw.eval.harness.metrics``).
  ``longbench`` is the mean of the six category means (``LONGBENCH_CATEGORIES``), as the LongBench
  README's "Avg"; LongBench-E (the ``<task>_e`` files) is the separate group ``longbench_e``, also split
  by length (0-4k, 4-8k, 8k+ words) as LongBench's ``eval.py --e``. The chat tasks' wrapper is
  ``build_chat``'s string for the models LongBench names (``LONGBENCH_TEMPLATES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lctw.eval.ruler.templates import REFERENCE_TEMPLATES as RULER_TEMPLATES
from lctw.eval.templates import Reference

FAMILIES = ("mmlu", "bbh", "longbench")
MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_FEWSHOT = 5  # lm-eval's and the Open LLM Leaderboard's MMLU setting
BBH_FEWSHOT = 3  # lm-eval's bbh_fewshot; the official prompt files hold exactly 3 exemplars per task
# lm-eval's bbh/fewshot/_fewshot_template_yaml and bbh/zeroshot/_zeroshot_template_yaml (version 3.0).
BBH_FEWSHOT_UNTIL = ["</s>", "Q", "\n\n"]
BBH_ZEROSHOT_UNTIL = ["</s>", "Q:", "<|im_end|>"]
BBH_MAX_GEN_TOKS = 256  # neither template sets it: lm-eval's HFLM default
BBH_ZEROSHOT_MATCH = {"ignore_case": True, "regexes_to_ignore": ["\\.$", ",", "\n", "\\\\", '"']}
# LongBench's six categories (English tasks), as in its README's tables.
LONGBENCH_CATEGORIES = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique"),
    "summarization": ("gov_report", "qmsum", "multi_news"),
    "few_shot": ("trec", "triviaqa", "samsum"),
    "synthetic": ("passage_count", "passage_retrieval_en"),
    "code": ("lcc", "repobench-p"),
}
LONGBENCH_E_BUCKETS = ((0, 4000, "0-4k"), (4000, 8000, "4-8k"), (8000, None, "8k+"))  # eval.py's scorer_e


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    prompt: str  # the reference prompt, with {context} and {input}
    max_new_tokens: int
    metric: str  # key of lctw.eval.harness.metrics.LONGBENCH_METRICS, also the metric name lm-eval reports
    first_line: bool = False  # score only the first line of the prediction (leading newlines dropped)
    stop_at_newline: bool = False  # samsum: no EOS/newline as first token, newline ends the generation
    chat: bool = True  # wrapped in the chat template when one is applied (pred.py's few-shot and code tasks
    # run raw: trec, triviaqa, samsum, lcc, repobench-p and the Chinese lsht, which is not in this table)


# The chat tasks' wrapper (``lctw.eval.templates``: the format names are RULER's). THUDM/LongBench v1's
# pred.py ``build_chat`` has one string per family of the models it lists; of Llama models it lists only
# llama2-7b-chat-4k (meta-llama/Llama-2-7b-chat-hf): "[INST]" + prompt + "[/INST]", no spaces inside,
# unlike RULER's meta-chat. The tokenizer adds BOS when the wrapped prompt is encoded (``tokenizer(prompt)``
# in pred.py). build_chat returns the prompt of a model it does not list unchanged, so a base Llama gets
# plain text. LongBench v1 lists no Llama 3 model (LongBench v2 sends Llama 3.1 Instruct through vLLM's
# chat API, i.e. the tokenizer's template, but that is another benchmark): an instruct Llama 3 gets its
# chat format without the tokenizer's system block (Llama 3.1's date block), RULER's meta-llama3 string.
# Not reproduced: build_chat's strings for ChatGLM (built by its remote-code tokenizer), LongChat / Vicuna
# (FastChat's vicuna_v1.1 conversation), XGen and InternLM (their answers are also post-processed).
_LLAMA3_TURN = RULER_TEMPLATES["meta-llama3"].replace("{task_template}", "{prompt}")
LONGBENCH_TEMPLATES = Reference(
    name="LongBench", key="longbench.chat_template", source="THUDM/LongBench pred.py, build_chat's llama2 string",
    placeholder="prompt",
    templates={"base": "{prompt}", "meta-chat": "[INST]{prompt}[/INST]", "meta-llama3": _LLAMA3_TURN},
    named=frozenset({"meta-chat"}),
    borrowed={
        "base": ("plain text (no chat template: what pred.py's build_chat leaves a model it does not list)",
                 "a base model: plain text, as pred.py sends any model its build_chat does not list"),
        "meta-llama3": ("Llama 3's chat format without a system block (RULER's meta-llama3 string; LongBench v1 "
                        "has no Llama 3 template)",
                        "an instruct Llama 3, which LongBench v1 does not name: its chat format without the "
                        "tokenizer's system block (RULER's meta-llama3 string)"),
    },
)

_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_MQA = f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:"
LONGBENCH_TASKS: dict[str, LongBenchTask] = {
    t.name: t
    for t in (
        LongBenchTask(
            "narrativeqa",
            "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
            "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
            "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a "
            "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
            128, "qa_f1",
        ),
        LongBenchTask(
            "qasper",
            "You are given a scientific article and a question. Answer the question as concisely as you can, using "
            "a single phrase or sentence if possible. If the question cannot be answered based on the information "
            "in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
            "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question "
            "based on the above article as concisely as you can, using a single phrase or sentence if possible. If "
            "the question cannot be answered based on the information in the article, write \"unanswerable\". If "
            "the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
            "explanation.\n\nQuestion: {input}\n\nAnswer:",
            128, "qa_f1",
        ),
        LongBenchTask(
            "multifieldqa_en",
            "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based "
            "on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
            "Answer:",
            64, "qa_f1",
        ),
        LongBenchTask("hotpotqa", _MQA, 32, "qa_f1"),
        LongBenchTask("2wikimqa", _MQA, 32, "qa_f1"),
        LongBenchTask("musique", _MQA, 32, "qa_f1"),
        LongBenchTask(
            "gov_report",
            "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
            "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
            512, "rouge_l",
        ),
        LongBenchTask(
            "qmsum",
            "You are given a meeting transcript and a query containing a question or instruction. Answer the "
            "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
            "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
            512, "rouge_l",
        ),
        LongBenchTask(
            "multi_news",
            "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
            "Now, write a one-page summary of all the news.\n\nSummary:",
            512, "rouge_l",
        ),
        LongBenchTask(
            "trec",
            "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
            64, "classification", first_line=True, chat=False,
        ),
        LongBenchTask(
            "triviaqa",
            "Answer the question based on the given passage. Only give me the answer and do not output any other "
            "words. The following are some examples.\n\n{context}\n\n{input}",
            32, "qa_f1", first_line=True, chat=False,
        ),
        LongBenchTask(
            "samsum",
            "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
            "{input}",
            128, "rouge_l", first_line=True, chat=False, stop_at_newline=True,
        ),
        LongBenchTask(
            "passage_count",
            "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
            "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
            "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
            "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
            "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
            32, "count",
        ),
        LongBenchTask(
            "passage_retrieval_en",
            "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
            "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
            "of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
            "\"Paragraph 2\", etc.\n\nThe answer is: ",
            32, "retrieval",
        ),
        LongBenchTask("lcc", "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim",
                      chat=False),
        LongBenchTask("repobench-p", "Please complete the code given below. \n{context}{input}Next line of code:\n",
                      64, "code_sim", chat=False),
    )
}


def longbench_base(task: str) -> str:
    """The table entry a task name refers to: LongBench-E's ``<task>_e`` files use ``<task>``'s protocol."""
    return task[:-2] if task.endswith("_e") and task[:-2] in LONGBENCH_TASKS else task


def longbench_budget(window: int) -> int:
    """The prompt budget of LongBench's ``model2maxlen.json`` for a model of ``window`` positions.

    The reference gives 3500 / 7500 / 15500 / 31500 tokens to 4k / 8k / 16k / 32k models: the window in
    thousands of tokens (4096 -> 4) times 1000, less 500 (room for the answer and the chat wrapper).
    """
    budget = int(window / 1024 * 1000) - 500
    if budget < 1:
        raise ValueError(f"a {window}-position model leaves no LongBench prompt budget "
                         "(window / 1024 * 1000 - 500): set eval.longbench.max_length")
    return budget


def longbench_category(task: str) -> str:
    base = longbench_base(task)
    return next(c for c, names in LONGBENCH_CATEGORIES.items() if base in names)
