"""Which wrapper a benchmark prompt gets: the reference's own hand-written template for the model, the
tokenizer's chat template, or none. One place for RULER and LongBench.

Why this matters: neither reference uses the tokenizer's chat template. NVIDIA/RULER wraps every prompt
in a string of ``scripts/data/template.py`` picked per model (``lctw.eval.ruler.templates``);
THUDM/LongBench's ``pred.py`` wraps its chat tasks in a string written into ``build_chat`` per model it
lists (``lctw.eval.harness.longbench``). A tokenizer's own template adds what those strings do not have
(Llama 3.1's system block with its knowledge cutoff and today's date, SmolLM2's default system prompt),
and a base model whose tokenizer ships a template (Meta-Llama-3-8B's does) would be wrapped where the
references send plain text. So ``auto`` takes the reference's template for the models it names and the
tokenizer's template only for other models.

Template names are those of the *model format*, the same for every reference, each reference with its
own string (``Reference.templates``):

* ``base``: no wrapper (plain text);
* ``meta-chat``: Llama 2 chat (``[INST] ... [/INST]``, spaced as the reference spaces it);
* ``meta-llama3``: Llama 3.x instruct, one user turn without a system block;
* ``tokenizer``: ``tokenizer.apply_chat_template`` (the setting ``true``, or ``auto`` for a model the
  reference does not name whose tokenizer has a template).

A benchmark's ``chat_template`` setting is one of ``SETTINGS``: ``auto``, ``true`` (the tokenizer's),
``false`` (``base``), or a template name. The template that ran is recorded with the results as
``template``, ``template_reason`` and ``prompt_format`` (``Reference.resolve``, ``Reference.describe``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

BASE = "base"
TOKENIZER = "tokenizer"  # the tokenizer's own chat template
FORMATS = (BASE, "meta-chat", "meta-llama3")  # the model formats a reference may have a string for
# What a ``chat_template`` setting may be; the config layer checks values against this annotation.
Setting = Literal["auto", True, False, "tokenizer", "base", "meta-chat", "meta-llama3"]
SETTINGS = get_args(Setting)

# Llama 2 / Llama 3.x by name ("Llama-2-7b-chat-hf", "Meta-Llama-3.1-8B-Instruct", "llama3-8b"), not
# TinyLlama, CodeLlama or the 30B Llama 1.
_LLAMA = re.compile(r"(?:^|[^a-z])llama[-_ ]?([23])(?:[^0-9]|$)")


def model_format(name: str | None) -> str | None:
    """The model format of a model of this name (hub id or path), or None for another family.

    Llama 2 chat models are ``meta-chat``, Llama 3.x instruct models ``meta-llama3``, and the base models
    of both families ``base``.
    """
    base = short_name(name).lower()
    match = _LLAMA.search(base)
    if match is None:
        return None
    if match.group(1) == "2":
        return "meta-chat" if "chat" in base else BASE
    return "meta-llama3" if "instruct" in base or "chat" in base else BASE


def model_name(model) -> str | None:
    """The hub id or path a model was loaded from (its config's ``_name_or_path``), or None."""
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def short_name(name: str | None) -> str:
    """``meta-llama/Llama-2-7b-chat-hf`` -> ``Llama-2-7b-chat-hf`` (a path's last part)."""
    return (name or "").rstrip("/").rpartition("/")[2]


def is_setting(value) -> bool:
    """Whether ``value`` is one of ``SETTINGS`` (``1`` is not ``True`` here)."""
    return any(value == s and type(value) is type(s) for s in SETTINGS)


def allowed(key: str, value) -> str:
    """The error message of a ``chat_template`` value that is not a setting."""
    return (f"{key}={value!r} is not allowed: choose auto, true (the tokenizer's chat template), false "
            f"(plain text), {TOKENIZER} or one of the reference templates {list(FORMATS)}")


@dataclass(frozen=True)
class Reference:
    """One benchmark's hand-written templates and how its ``auto`` chooses among them."""

    name: str  # "RULER", "LongBench"
    key: str  # the setting's config key, in messages and reasons: "chat_template", "longbench.chat_template"
    source: str  # where the strings are written: "NVIDIA/RULER scripts/data/template.py"
    placeholder: str  # where the prompt goes in a template: "task_template" for "{task_template}"
    templates: Mapping[str, str]  # format -> the reference's string, one for each of FORMATS
    named: frozenset[str]  # the formats of the models the reference itself names
    # a format it names no model of: (prompt_format, why ``auto`` takes it for a model of that format)
    borrowed: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def template_of(self, setting: str | bool) -> str:
        """A resolved setting's template (True: the tokenizer's, False: ``base``); an unknown name is refused."""
        template = {True: TOKENIZER, False: BASE}.get(setting, setting)
        if template != TOKENIZER and template not in self.templates:
            raise ValueError(f"unknown {self.name} template {template!r}: choose one of "
                             f"{[*self.templates, TOKENIZER]}")
        return template

    def check_chat(self, template: str, tokenizer) -> None:
        """The tokenizer's chat template is asked for (``template`` is ``tokenizer``): it must have one."""
        if template == TOKENIZER and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{self.key}=true but the tokenizer has no chat template")

    def wrap(self, template: str, prompt: str) -> str:
        """``prompt`` in one of this reference's templates."""
        return self.templates[template].format(**{self.placeholder: prompt})

    def writes_bos(self, template: str, tokenizer) -> bool:
        """Whether prompts in ``template`` carry BOS as text, so the tokenizer must not add another (the
        tokenizer's chat template, ``meta-llama3`` with a tokenizer whose BOS is ``<|begin_of_text|>``)."""
        if template == TOKENIZER:
            return True
        bos = getattr(tokenizer, "bos_token", None)
        return bool(bos and self.templates[template].startswith(bos))

    def resolve(self, setting: bool | str, tokenizer, model_name: str | None = None) -> tuple[str, str]:
        """(template, why it was chosen) for a ``chat_template`` setting.

        ``auto``: the reference's template for a Llama 2 / 3 model (``model_format`` of ``model_name``,
        then of the tokenizer's ``name_or_path``), else the tokenizer's chat template when it has one,
        else ``base`` (plain text). ``True`` or ``tokenizer``: the tokenizer's template; ``False``:
        ``base``; a format's name: the reference's string for it. Anything else is a ``ValueError``.
        """
        if not is_setting(setting):
            raise ValueError(allowed(self.key, setting))
        if setting == "auto":
            for name in (model_name, getattr(tokenizer, "name_or_path", None)):
                template = model_format(name)
                if template is None:
                    continue
                if template in self.named:
                    return template, f"{self.name}'s template for {short_name(name)}"
                return template, f"{short_name(name)}, {self.borrowed[template][1]}"
            if getattr(tokenizer, "chat_template", None):
                return TOKENIZER, f"a model {self.name} does not name, whose tokenizer has a chat template"
            return BASE, f"a model {self.name} does not name, whose tokenizer has no chat template"
        if setting is True or setting == TOKENIZER:
            return TOKENIZER, f"{self.key}={str(setting).lower()}"
        if setting is False:
            return BASE, f"{self.key}=false"
        return setting, f"{self.key}={setting}"

    def describe(self, template: str) -> str:
        """The ``prompt_format`` recorded in the results."""
        if template == TOKENIZER:
            return "chat template (the tokenizer's own)"
        if template in self.borrowed:
            return self.borrowed[template][0]
        if template == BASE:
            return f"plain text (no chat template: {self.name}'s base template)"
        return f"{self.name}'s {template} template ({self.source})"
