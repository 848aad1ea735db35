"""Which wrapper a RULER prompt gets: one of the reference's hand-written model templates, the tokenizer's
chat template, or none.

Why this matters: NVIDIA/RULER does not use the tokenizer's chat template. ``scripts/data/prepare.py``
wraps every task prompt in a template of ``scripts/data/template.py`` picked per model
(``MODEL_TEMPLATE_TYPE`` in ``scripts/config_models.sh``), then appends the answer prefix:
``base`` (no wrapper) for base models, ``meta-chat`` for Llama 2 chat, ``meta-llama3`` for Llama 3
instruct. A tokenizer's own template adds what those strings do not have (Llama 3.1's system block with
its knowledge cutoff and today's date, SmolLM2's default system prompt), and a base model whose tokenizer
ships a template (Meta-Llama-3-8B's does) would be wrapped where RULER sends plain text. So ``auto``
takes the reference's choice for the models the reference names (``lctw.eval.templates.model_format``) and the
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

from lctw.eval.templates import Reference

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
