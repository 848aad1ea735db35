"""Model specs (``conf/model``): cheap to instantiate, loading only when ``load()`` is called.

A spec gives ``tokenizer()`` and ``load()`` so that configuration errors (including a small scorer's
vocabulary) are found before any weights load.

* ``HFModel``: any causal LM by hub name or local path through ``AutoModelForCausalLM`` (dtype,
  attention implementation, gradient checkpointing, revision, ``gguf_file``; remote code off by default).
* ``TinyLlama``: a small Llama built from config with a byte-level BPE tokenizer trained locally on the
  default corpus (seconds), whose base θ0 is really pretrained at the short context n by a short base
  stage on first use and cached under ``<cache>/tiny/<key>``: later runs reuse it, and ``scorer=frozen``
  has a genuine θ0. The key hashes everything that changes the base, so a change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class HFModel:
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
            raise ValueError(f"model.dtype={dtype!r} is not allowed: choose one of {list(DTYPES)}")
        if attn_implementation not in ATTENTION:
            raise ValueError(
                f"model.attn_implementation={attn_implementation!r} is not allowed: choose one of {list(ATTENTION)}"
            )
        self.name_or_path, self.revision, self.dtype = name_or_path, revision, dtype
        self.attn_implementation, self.gradient_checkpointing = attn_implementation, gradient_checkpointing
        self.trust_remote_code, self.gguf_file, self.tokenizer_path = trust_remote_code, gguf_file, tokenizer_path

    def _common(self) -> dict:
        kw = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path or self.name_or_path, **self._common())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.name_or_path, dtype=DTYPES[self.dtype], attn_implementation=self.attn_implementation,
            **self._common(),
        )
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def describe(self) -> str:
        return f"{self.name_or_path}@{self.revision or 'main'}"


class TinyLlama(HFModel):
    """A few-million-parameter Llama for CPU development, pretrained at context n on first use."""

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
        base_steps: int = 300,
        base_batch_size: int = 8,
        base_lr: float = 3e-3,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
    ):
        arch = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                    num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                    intermediate_size=intermediate_size, rope_theta=rope_theta)
        self.arch, self.n = arch, int(n)
        self.base = dict(steps=base_steps, batch_size=base_batch_size, lr=base_lr, seed=seed)
        key = hashlib.sha256(json.dumps({"arch": arch, "n": n, "base": self.base, "v": 1}, sort_keys=True).encode())
        self.root = Path(cache_dir).expanduser() / "tiny"
        self.cache_dir = cache_dir
        path = self.root / key.hexdigest()[:12]
        super().__init__(str(path), attn_implementation=attn_implementation,
                         gradient_checkpointing=gradient_checkpointing)

    @property
    def path(self) -> Path:
        return Path(self.name_or_path)

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        tok_dir = self.root / f"tokenizer-{self.arch['vocab_size']}"
        with _build_lock(tok_dir):
            if not (tok_dir / "tokenizer.json").exists():
                train_tokenizer(self.arch["vocab_size"], tok_dir)
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))

    def load(self):
        with _build_lock(self.path):  # DDP ranks / parallel sweep jobs on a fresh cache: one builds, the rest wait
            if not (self.path / "config.json").exists():
                self.pretrain()
        return super().load()

    def pretrain(self) -> None:
        """The base stage: train from scratch on the default corpus at context n, then cache."""
        import lightning as L
        from lightning.pytorch.callbacks import TQDMProgressBar
        from transformers import LlamaConfig, LlamaForCausalLM

        from lctw.data import LongDocuments
        from lctw.module import TokenWeightingLM
        from lctw.scoring import NoScorer
        from lctw.weighting import Uniform

        log.info("building the tiny base model at n=%d (%d steps; cached in %s)", self.n, self.base["steps"], self.path)
        tok = self.tokenizer()
        L.seed_everything(self.base["seed"], workers=True, verbose=False)
        arch = dict(self.arch)
        config = LlamaConfig(
            **{k: v for k, v in arch.items() if k != "rope_theta"},
            rope_parameters={"rope_type": "default", "rope_theta": arch["rope_theta"]},
            max_position_embeddings=self.n, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True, attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
        data = LongDocuments(max_len=self.n, batch_size=self.base["batch_size"], cache_dir=self.cache_dir,
                             tokenizer=tok, seed=self.base["seed"])
        steps = self.base["steps"]
        optimizer = lambda p: torch.optim.AdamW(p, lr=self.base["lr"], betas=(0.9, 0.95), weight_decay=0.1)  # noqa: E731
        from transformers import get_cosine_schedule_with_warmup

        scheduler = lambda o: get_cosine_schedule_with_warmup(o, max(1, steps // 10), steps)  # noqa: E731
        module = TokenWeightingLM(model, NoScorer(), Uniform(), n=self.n, optimizer=optimizer, scheduler=scheduler)
        trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False,
                            enable_checkpointing=False, gradient_clip_val=1.0, val_check_interval=steps,
                            check_val_every_n_epoch=None,
                            limit_val_batches=8, num_sanity_val_steps=0, enable_model_summary=False,
                            callbacks=[TQDMProgressBar(refresh_rate=10)])
        trainer.fit(module, datamodule=data)
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (tmp / "lctw_base.json").write_text(json.dumps({"n": self.n, "arch": self.arch, "base": self.base,
                                                        "metrics": metrics}, indent=2))
        shutil.rmtree(self.path, ignore_errors=True)
        tmp.rename(self.path)
        log.info("tiny base ready: %s (val/ce at n: %.3f)", self.path, metrics.get("val/ce", float("nan")))

    def describe(self) -> str:
        return f"tiny:{self.path.name}"


def _build_lock(path: Path):
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


def train_tokenizer(vocab_size: int, out_dir: Path) -> None:
    """The tiny model's tokenizer: a byte-level BPE trained on the default corpus, saved to ``out_dir``."""
    from lctw.data import essays

    fast = bpe_tokenizer(essays(), vocab_size)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
