"""The harness's task families and the LongBench task table: what each task asks and how it is scored.

These are the protocols that published numbers use, so they live apart from the code that reads data
(``readers``) and the code that hands them to lm-eval (``lmeval``); changing anything here moves scores.

* **MMLU** (Hendrycks et al.): prompt, description and metric are lm-eval's ``mmlu`` (loglikelihood of
  " A".." D", ``acc``); few-shot examples are the first k of the subject's dev file, as there. ``mmlu``
  is the micro average (weighted by subject size), like lm-eval's group score.
* **BBH** (Suzgun et al.): answer-only ("CoT-free") prompting, ``Q: {input}\\nA:`` with the task's
  description and k exemplars, greedy until ``Q:`` or a blank line, exact match of the stripped
  generation (lm-eval's ``bbh_fewshot``). ``bbh`` is the unweighted mean over tasks, as BBH reports.
* **LongBench** (Bai et al., 2023): the 16 English tasks with the reference prompts
  (``config/dataset2prompt.json``), generation lengths (``dataset2maxlen.json``), middle truncation of
  the prompt to ``longbench_max_length`` tokens, the chat template skipped for trec / triviaqa / samsum /
  lcc / repobench-p, the first line only for trec / triviaqa / samsum, the max over reference answers and
  the reference metrics (``lctw.eval.harness.metrics``). samsum is not forced to a first token other
  than newline (LongBench passes ``min_length`` and stops at newline; here generation runs to the length
  limit and only the first non-empty line is scored, which differs only when the model's first line is
  empty). ``longbench`` is the unweighted mean over tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("mmlu", "bbh", "longbench")
MMLU_LETTERS = ("A", "B", "C", "D")
BBH_UNTIL = ["</s>", "Q:", "\n\n"]
BBH_MAX_GEN_TOKS = 128


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    prompt: str  # the reference prompt, with {context} and {input}
    max_new_tokens: int
    metric: str  # key of lctw.eval.harness.metrics.LONGBENCH_METRICS, also the metric name lm-eval reports
    first_line: bool = False  # score only the first line of the prediction (leading newlines dropped)
    chat: bool = True  # wrapped in the chat template when one is applied (few-shot and code tasks run raw)


_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_MQA = f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:"
LONGBENCH_TASKS: dict[str, LongBenchTask] = {
    t.name: t
    for t in (
        LongBenchTask(
            "narrativeqa",
            "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
            "question as concisely as you can, using a single phrase if possible. Do not provide any explanation."
            "\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a "
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
            128, "rouge_l", first_line=True, chat=False,
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
