"""Task prompts: the text after the queries that tells the LLM which task to do.

One place defines them so training, evaluation and serving write exactly the same strings.
"""

from __future__ import annotations

CAPTION = "caption:"
VQA = "question: {question} answer:"
DETECT = "detect:"
DETECT_LABELS = "detect {labels}:"


def caption_prompt() -> str:
    return CAPTION


def vqa_prompt(question: str) -> str:
    return VQA.format(question=" ".join(question.split()))


def detect_prompt(labels: list[str] | None = None) -> str:
    """All objects, or only those with the given labels ("detect red circle, blue square:")."""
    if not labels:
        return DETECT
    return DETECT_LABELS.format(labels=", ".join(" ".join(label.split()) for label in labels))
