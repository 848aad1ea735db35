"""Which wrapper a RULER prompt gets: one of the reference's hand-written model templates, the tokenizer's
chat template, or none.

Why this matters: NVIDIA/RULER does not use the tokenizer's chat template. ``scripts/data/prepare.py``
wraps every task prompt in a template of ``scripts/data/template.py`` picked per model
(``MODEL_TEMPLATE_TYPE`` in ``scripts/config_models.sh``), then appends the answer prefix:
``base`` (no wrapper) for base models, ``meta-chat`` for Llama 2 chat, ``meta-llama3`` for Llama 3
instruct. A tokenizer's own template adds what those strings do not have (Llama 3.1's system block with
its knowledge cutoff and today's date, SmolLM2's default system prompt), and a base model whose tokenizer
ships a template (Meta-Llama-3-8B's does) would be wrapped where RULER sends plain text. So ``auto``
takes the reference's choice for the models the reference names (``reference_template_for``) and the
tokenizer's template only for other models.

Template names, as recorded in the results (``config.template``):

* ``base``, ``meta-chat``, ``meta-llama3``: the reference's strings (``REFERENCE_TEMPLATES``); ``base``
  and ``meta-chat`` are checked against the copy of ``template.py`` in ``nvidia-long-context-eval``
  (tests/test_ruler.py), ``meta-llama3`` is in the newer repository only;
* ``tokenizer``: ``tokenizer.apply_chat_template`` (``chat_template=true``, or ``auto`` for a model the
  reference does not name whose tokenizer has a template).

Another reference template is one more entry in ``REFERENCE_TEMPLATES`` (and a name rule in
``reference_template_for`` if ``auto`` should pick it).
"""

from __future__ import annotations

import re

# NVIDIA/RULER scripts/data/template.py, verbatim; the answer prefix is appended after the wrapper.
REFERENCE_TEMPLATES = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "meta-llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
TOKENIZER = "tokenizer"  # the tokenizer's own chat template
TEMPLATES = (*REFERENCE_TEMPLATES, TOKENIZER)
SETTINGS = ("auto", True, False, *REFERENCE_TEMPLATES)  # what ``chat_template`` accepts

# Llama 2 / Llama 3.x by name ("Llama-2-7b-chat-hf", "Meta-Llama-3.1-8B-Instruct", "llama3-8b"), not
# TinyLlama, CodeLlama or the 30B Llama 1.
_LLAMA = re.compile(r"(?:^|[^a-z])llama[-_ ]?([23])(?:[^0-9]|$)")


def reference_template_for(name: str | None) -> str | None:
    """The template RULER's ``config_models.sh`` gives a model of this name (hub id or path), or None.

    Llama 2 chat models get ``meta-chat``, Llama 3.x instruct models ``meta-llama3``, and the base models
    of both families ``base``; models of other families are not matched.
    """
    base = (name or "").rstrip("/").rpartition("/")[2].lower()
    match = _LLAMA.search(base)
    if match is None:
        return None
    if match.group(1) == "2":
        return "meta-chat" if "chat" in base else "base"
    return "meta-llama3" if "instruct" in base or "chat" in base else "base"


def resolve_template(setting: bool | str, tokenizer, model_name: str | None = None) -> tuple[str, str]:
    """(template name, why it was chosen) for a ``chat_template`` setting.

    ``auto``: the reference's template for a model it names (by ``model_name``, then the tokenizer's
    ``name_or_path``), else the tokenizer's chat template when it has one, else ``base`` (plain text).
    ``True``: the tokenizer's template; ``False``: ``base``; a reference template's name: that template.
    """
    if setting == "auto":
        for name in (model_name, getattr(tokenizer, "name_or_path", None)):
            template = reference_template_for(name)
            if template is not None:
                return template, f"RULER's template for {name.rstrip('/').rpartition('/')[2]}"
        if getattr(tokenizer, "chat_template", None):
            return TOKENIZER, "a model RULER does not name, whose tokenizer has a chat template"
        return "base", "a model RULER does not name, whose tokenizer has no chat template"
    if setting is True:
        return TOKENIZER, "chat_template=true"
    if setting is False:
        return "base", "chat_template=false"
    if setting in REFERENCE_TEMPLATES:
        return setting, f"chat_template={setting}"
    raise ValueError(f"chat_template={setting!r} is not allowed: choose auto, true, false or one of "
                     f"RULER's templates {list(REFERENCE_TEMPLATES)}")


def describe(template: str) -> str:
    """The ``prompt_format`` recorded in the results."""
    if template == TOKENIZER:
        return "chat template (the tokenizer's own)"
    if template == "base":
        return "plain text (no chat template: RULER's base template)"
    return f"RULER's {template} template (NVIDIA/RULER scripts/data/template.py)"
