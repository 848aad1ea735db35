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
  (tests/test_ruler.py), ``meta-llama3`` is in the newer repository only (compared byte for byte with
  NVIDIA/RULER's ``scripts/data/template.py`` at commit c3f5e3b, 2026-12-06);
* ``tokenizer``: ``tokenizer.apply_chat_template`` (``chat_template=true``, or ``auto`` for a model the
  reference does not name whose tokenizer has a template).

The names, the settings, the rule that picks a template by model name and the resolver are shared with
LongBench (``lctw.eval.templates``); this module holds RULER's strings (``RULER``).
"""

from __future__ import annotations

from lctw.eval.templates import SETTINGS, TOKENIZER, Reference, model_format

# NVIDIA/RULER scripts/data/template.py, verbatim; the answer prefix is appended after the wrapper.
REFERENCE_TEMPLATES = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "meta-llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
RULER = Reference(name="RULER", key="chat_template", source="NVIDIA/RULER scripts/data/template.py",
                  placeholder="task_template", templates=REFERENCE_TEMPLATES,
                  named=frozenset(REFERENCE_TEMPLATES))  # config_models.sh names Llama 2 / 3, chat and base
TEMPLATES = (*REFERENCE_TEMPLATES, TOKENIZER)
__all__ = ["REFERENCE_TEMPLATES", "RULER", "SETTINGS", "TEMPLATES", "TOKENIZER", "describe",
           "reference_template_for", "resolve_template"]


def reference_template_for(name: str | None) -> str | None:
    """The template RULER's ``config_models.sh`` gives a model of this name (hub id or path), or None.

    Llama 2 chat models get ``meta-chat``, Llama 3.x instruct models ``meta-llama3``, and the base models
    of both families ``base``; models of other families are not matched (``lctw.eval.templates.model_format``).
    """
    return model_format(name)


def resolve_template(setting: bool | str, tokenizer, model_name: str | None = None) -> tuple[str, str]:
    """(template name, why it was chosen) for a ``chat_template`` setting (``Reference.resolve``).

    ``auto``: RULER's template for a model it names (by ``model_name``, then the tokenizer's
    ``name_or_path``), else the tokenizer's chat template when it has one, else ``base`` (plain text).
    ``True`` (or ``tokenizer``): the tokenizer's template; ``False``: ``base``; a reference template's
    name: that template.
    """
    return RULER.resolve(setting, tokenizer, model_name)


def describe(template: str) -> str:
    """The ``prompt_format`` recorded in the results."""
    return RULER.describe(template)
