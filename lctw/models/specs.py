"""Model specs (``conf/model``): cheap to instantiate, loading only when ``load()`` is called.

Specs are cheap, so configuration errors (including a small scorer's vocabulary) are found before any
weights load.

* ``HFModel``: any causal LM by hub name or local path through ``AutoModelForCausalLM`` (dtype,
  attention implementation, gradient checkpointing, revision, ``gguf_file``; remote code off by default).
* ``TinyLlama``: a small Llama built from config with a byte-level BPE tokenizer trained locally on the
  ``corpus`` it is given (seconds), whose base θ0 is really pretrained at the short context n by the base
  stage. The spec only says where θ0 lives (``<cache>/tiny/<key>/hf``); the entry points run the stage
  (:func:`lctw.training.stages.prepare`), which computes the key from the stage's composed config,
  builds θ0 if it is not cached, and binds the key to the spec (:meth:`TinyLlama.bind`).

A spec gives ``tokenizer()`` and ``load()``; it imports no training, data or Hydra code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def is_local_path(value: str) -> bool:
    """Whether a model (or run) reference is meant as a local path rather than a hub name: absolute, ``./``,
    ``../``, ``~``, or more than one ``/`` (a hub name is ``name`` or ``org/name``), or a ``.ckpt`` file.
    A local path that does not exist is then an error of its own, not a malformed hub name."""
    return (os.path.isabs(value) or value.startswith(("./", "../", "~")) or value in (".", "..")
            or value.count("/") > 1 or value.endswith(".ckpt"))


class HFModel:
    """Any causal LM by hub name or local path. ``load()`` returns it with weights; ``load(weights=False)``
    the same architecture, randomly initialised, when the weights are about to be replaced (a checkpoint)."""

    built_locally = False  # True for specs whose weights are built on first use (the tiny base)

    def __init__(
        self,
        name_or_path: str,
        revision: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        tokenizer_path: str | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {list(DTYPES)}")
        if attn_implementation not in ATTENTION:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not allowed: choose one of {list(ATTENTION)}"
            )
        for key, value in (("name_or_path", name_or_path), ("tokenizer_path", tokenizer_path)):
            if value and is_local_path(value) and not Path(value).expanduser().exists():
                raise ValueError(f"{key}={value!r} does not exist (a local path; a hub name is org/name)")
        self._name_or_path, self.revision, self.dtype = name_or_path, revision, dtype
        self.attn_implementation, self.gradient_checkpointing = attn_implementation, gradient_checkpointing
        self.trust_remote_code, self.gguf_file, self.tokenizer_path = trust_remote_code, gguf_file, tokenizer_path

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    def hub_options(self) -> dict:
        kw = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path or self.name_or_path, **self.hub_options())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load(self, weights: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        options = dict(dtype=DTYPES[self.dtype], attn_implementation=self.attn_implementation)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(self.name_or_path, **options, **self.hub_options())
        else:
            config = AutoConfig.from_pretrained(self.name_or_path, **self.hub_options())
            model = AutoModelForCausalLM.from_config(config, **options,
                                                     trust_remote_code=self.trust_remote_code)
        return self._finish(model)

    def _finish(self, model):
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def describe(self) -> str:
        return f"{self.name_or_path}@{self.revision or 'main'}"

    def pretrained_length(self) -> int | None:
        """The context the model was trained at, from a local ``config.json`` without loading weights;
        None when unknown (a hub model's config would need the hub)."""
        config = Path(self.name_or_path).expanduser() / "config.json"
        if not config.is_file():
            return None
        return json.loads(config.read_text()).get("max_position_embeddings")


class TinyLlama(HFModel):
    """A few-million-parameter Llama for CPU development whose θ0 is pretrained at context n by the base stage.

    ``pretrained=false`` gives the architecture freshly initialised (what the base stage trains), or with
    ``init`` the weights of that directory (a phased base's next phase, :mod:`lctw.training.phases`).
    ``base`` holds deltas to the base stage's recipe (``conf/experiment/base.yaml``, :mod:`lctw.training.base`).
    ``corpus`` returns the texts the tokenizer is trained on the first time it is needed (Hydra passes
    :func:`lctw.data.essays`); the trained tokenizer is cached under ``<cache_dir>/tiny``.
    """

    built_locally = True

    def __init__(
        self,
        n: int,
        cache_dir: str = "outputs/cache",
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        intermediate_size: int = 352,
        rope_theta: float = 10000.0,
        seed: int = 0,
        base: dict | None = None,
        pretrained: bool = True,
        init: str | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        corpus: Callable[[], list[str]] | None = None,
    ):
        if init is not None and pretrained:
            raise ValueError(f"init={init!r} needs pretrained=false (init is where the base stage starts from)")
        super().__init__("", attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing)
        self.arch = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         intermediate_size=intermediate_size, rope_theta=rope_theta)
        self.n, self.seed, self.pretrained, self.init = int(n), int(seed), bool(pretrained), init
        self.base = dict(base or {})
        self.cache_dir, self.corpus = cache_dir, corpus
        self.root = Path(cache_dir).expanduser() / "tiny"
        self.key: str | None = None  # the base stage's config hash, bound by lctw.training.stages.prepare

    def bind(self, key: str) -> TinyLlama:
        """θ0 is the base stage's run ``<cache_dir>/tiny/<key>``."""
        self.key = key
        return self

    @property
    def name_or_path(self) -> str:
        if not self.pretrained:
            return f"tiny-init-{self.arch}"
        if self.key is None:
            raise RuntimeError("model=tiny: θ0 is built by the base stage, which the entry point runs first "
                               "(lctw.training.stages.prepare(spec) builds or finds it and binds it to the spec)")
        return str(self.root / self.key / "hf")

    @property
    def path(self) -> Path:
        return Path(self.name_or_path)

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        tok_dir = self.root / f"tokenizer-{self.arch['vocab_size']}"
        with build_lock(tok_dir):
            if not (tok_dir / "tokenizer.json").exists():
                if self.corpus is None:
                    raise RuntimeError(f"model=tiny: no tokenizer in {tok_dir} and no corpus to train one on "
                                       "(model.corpus, e.g. lctw.data.essays)")
                train_tokenizer(self.corpus(), self.arch["vocab_size"], tok_dir)
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))

    def load(self, weights: bool = True):
        if self.init is not None and weights:  # the next phase of a phased base starts from the previous one's θ
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(self.init, attn_implementation=self.attn_implementation)
            return self._finish(model)
        if not self.pretrained or not weights:
            return self._finish(self.initial())
        return super().load()

    def initial(self):
        """The architecture, freshly initialised from the global torch seed (the base stage's start)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = self.tokenizer()
        arch = {k: v for k, v in self.arch.items() if k != "rope_theta"}
        config = LlamaConfig(
            **arch, rope_parameters={"rope_type": "default", "rope_theta": self.arch["rope_theta"]},
            max_position_embeddings=self.n, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True, attn_implementation=self.attn_implementation,
        )
        return LlamaForCausalLM(config)

    def describe(self) -> str:
        if not self.pretrained:
            return "tiny:initial"
        return f"tiny:{self.key}" if self.key else "tiny:θ0 (not built yet)"

    def pretrained_length(self) -> int:
        return self.n  # the base stage pretrains θ0 at n


def build_lock(path: Path):
    """An inter-process lock beside ``path`` (``filelock``, which transformers and datasets depend on)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def bpe_tokenizer(texts, vocab_size: int, add_bos: bool = False):
    """A byte-level BPE trained on ``texts`` in seconds, with <s> (BOS), </s> (EOS) and <pad>.

    ``add_bos=True`` makes encoding prepend BOS, as Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def train_tokenizer(texts, vocab_size: int, out_dir: Path) -> None:
    """The tiny model's tokenizer: a byte-level BPE trained on ``texts``, saved to ``out_dir``."""
    fast = bpe_tokenizer(texts, vocab_size)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
