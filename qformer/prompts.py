"""Task prompts: the text after the queries that tells the LLM which task to do.

A model answers best in the words it was trained with, so the prompts belong to the bundle
(`BridgeConfig.prompts`, written into qbridge.json): the demo LLM learned "caption:" and
"question: ... answer:", while BLIP-2 was trained with an empty caption prompt and evaluated with
"Question: ... Answer:". Training, evaluation, the CLI and the service all read the bundle's prompts, so
they write exactly the same strings.

    prompts = bundle.config.prompts
    prompts.vqa_prompt("what colour  is the circle?")   # "question: what colour is the circle? answer:"
    PRESETS["blip2-opt"].caption_prompt()                # ""
"""

from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskPrompts:
    caption: str = "caption:"
    vqa: str = "question: {question} answer:"  # {question}: the question, whitespace collapsed
    detect: str = "detect:"  # every object
    detect_labels: str = "detect {labels}:"  # only these objects; {labels}: "red circle, blue square"

    def __post_init__(self) -> None:
        # Checked when a bundle loads, so a typo in qbridge.json fails there and not at the first request.
        for name, wanted in (("caption", set()), ("vqa", {"question"}), ("detect", set()),
                             ("detect_labels", {"labels"})):
            template = getattr(self, name)
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as exc:
                raise ValueError(f"prompt {name} {template!r} is not a valid template: {exc}") from None
            if fields != wanted:
                need = ", ".join("{" + f + "}" for f in sorted(wanted)) or "no {...} fields"
                raise ValueError(f"prompt {name} {template!r} must contain {need}")

    def caption_prompt(self) -> str:
        return self.caption.format()

    def vqa_prompt(self, question: str) -> str:
        return self.vqa.format(question=" ".join(question.split()))

    def detect_prompt(self, labels: list[str] | None = None) -> str:
        """All objects, or only those with the given labels ("detect red circle, blue square:")."""
        if not labels:
            return self.detect.format()
        return self.detect_labels.format(labels=", ".join(" ".join(label.split()) for label in labels))


PRESETS = {
    # qbridge's own convention: what `qbridge train` writes by default and the demo LLM was pretrained on.
    "qbridge": TaskPrompts(),
    # BLIP-2's (LAVIS and the transformers model cards): captions continue from nothing; OPT answers after
    # "Answer:", Flan-T5 after "Short answer:". BLIP-2 never detects; the detection prompts stay qbridge's.
    "blip2-opt": TaskPrompts(caption="", vqa="Question: {question} Answer:"),
    "blip2-flan-t5": TaskPrompts(caption="", vqa="Question: {question} Short answer:"),
}

DEFAULT_PROMPTS = PRESETS["qbridge"]  # bundles written before prompts were part of qbridge.json asked these


def preset(name: str) -> TaskPrompts:
    if name not in PRESETS:
        raise ValueError(f"unknown task prompt preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


# The default preset's methods, for the demo LLM's pretraining (training.demo.pretrain, training.demo.oracle), which
# has no bundle yet: the demo's own convention, the one the demo bundle's config carries. Everything that
# has a bundle or a bridge config reads `config.prompts` instead.
caption_prompt = DEFAULT_PROMPTS.caption_prompt
vqa_prompt = DEFAULT_PROMPTS.vqa_prompt
detect_prompt = DEFAULT_PROMPTS.detect_prompt
