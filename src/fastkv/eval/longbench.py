"""LongBench (Bai et al., 2023, arXiv 2308.14508) in its own format, from files the user brings.

Point `load_task` at a directory holding LongBench's `{task}.jsonl` files (fields `input`, `context`,
`answers`, `all_classes`, ...): nothing is downloaded. Prompts, answer lengths, the tasks that skip the
chat template, first-line post-processing and metrics are LongBench's. A prompt longer than the window
is cut in the middle, keeping its first and last halves, as LongBench does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import metrics

# task: (metric, max_tokens, prompt); the English tasks of LongBench v1.
_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
    "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
TASKS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": (
        "qa_f1",
        128,
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question as concisely as you can, using a single phrase if possible. Do not provide any explanation."
        "\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "qasper": (
        "qa_f1",
        128,
        "You are given a scientific article and a question. Answer the question as concisely as you can, using "
        "a single phrase or sentence if possible. If the question cannot be answered based on the information "
        'in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on '
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the "
        'question cannot be answered based on the information in the article, write "unanswerable". If the '
        'question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
        "\n\nQuestion: {input}\n\nAnswer:",
    ),
    "multifieldqa_en": (
        "qa_f1",
        64,
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based "
        "on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
        "Answer:",
    ),
    "hotpotqa": ("qa_f1", 32, _QA_PASSAGES),
    "2wikimqa": ("qa_f1", 32, _QA_PASSAGES),
    "musique": ("qa_f1", 32, _QA_PASSAGES),
    "gov_report": (
        "rouge_l",
        512,
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    ),
    "qmsum": (
        "rouge_l",
        512,
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
        "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    ),
    "multi_news": (
        "rouge_l",
        512,
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
    ),
    "trec": (
        "classification",
        64,
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    ),
    "triviaqa": (
        "qa_f1",
        32,
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}",
    ),
    "samsum": (
        "rouge_l",
        128,
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    ),
    "passage_count": (
        "count",
        32,
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
        "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    ),
    "passage_retrieval_en": (
        "retrieval",
        32,
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        'of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph '
        '2", etc.\n\nThe answer is: ',
    ),
    "lcc": ("code_sim", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("code_sim", 64, "Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
# Few-shot and completion tasks are run without the chat template; the few-shot ones keep the first line.
NO_CHAT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum"}
UNSUPPORTED = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}


@dataclass
class Example:
    task: str
    index: int
    prompt: str  # before truncation and chat template
    answers: list[str]
    all_classes: list[str]
    max_tokens: int
    chat: bool


def load_task(directory: str | Path, task: str) -> list[Example]:
    if task in UNSUPPORTED:
        raise ValueError(f"LongBench task {task!r} is Chinese, which fastkv does not score (needs jieba)")
    if task not in TASKS:
        raise ValueError(f"unknown LongBench task {task!r}: choose from {sorted(TASKS)}")
    path = Path(directory) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: put LongBench's {task}.jsonl in {directory}")
    metric, new_tokens, template = TASKS[task]
    examples = []
    with open(path) as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            examples.append(
                Example(
                    task=task,
                    index=i,
                    prompt=template.format(context=row["context"], input=row.get("input", "")),
                    answers=list(row["answers"]),
                    all_classes=list(row.get("all_classes") or []),
                    max_tokens=new_tokens,
                    chat=task not in NO_CHAT,
                )
            )
    return examples


def truncate_middle(tokenizer, prompt: str, max_tokens: int) -> str:
    """Keep the first and last max_tokens // 2 tokens of a prompt that is too long."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
        ids[-half:], skip_special_tokens=True
    )


def postprocess(task: str, prediction: str) -> str:
    return prediction.lstrip("\n").split("\n")[0] if task in FIRST_LINE else prediction


def score(example: Example, prediction: str) -> float:
    metric = TASKS[example.task][0]
    return metrics.best_score(
        metric, postprocess(example.task, prediction), example.answers, all_classes=example.all_classes
    )
