"""Shared fixtures: tiny models built from config, the locally trained tokenizer, Hydra composition.

Everything is built locally (no hub). The cache (tokenizer, tokenized data, the tiny base) lives in
one temporary directory per test session, so CI always exercises the first-use build path.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lctw import models
from lctw.data import essays

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def tiny_llama(layers: int = 2, vocab: int = 64, seed: int = 0, attn: str = "sdpa", **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = {"max_position_embeddings": 64, **kw}
    config = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                         attn_implementation=attn, **kw)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lctw-cache")
    os.environ["LCTW_CACHE"] = str(path)
    return str(path)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests must not leak global torch state into each other."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# Overrides that shrink the default experiment to seconds while keeping every part real.
SMALL = [
    "n=32", "N=128", "+model.base.trainer.max_steps=6", "+model.base.data.batch_size=4", "trainer.max_steps=3",
    "trainer.val_check_interval=3", "checkpoint_every=3", "trainer.limit_val_batches=2", "data.batch_size=2",
    "data.val_batch_size=2", "logger.mode=offline",
]

# the shortened default run, without the tiny model's base-stage keys and with no logger (for model=hf)
RUN = [o for o in SMALL if not o.startswith(("+model.base", "logger."))]


@pytest.fixture(scope="session")
def hf_model(cache_dir, tmp_path_factory):
    """A small Llama with tied embeddings (every row of the embedding gets a gradient through the LM head),
    initialised like a pretrained model, N(0, 0.02), saved as a local Hugging Face model."""
    path = tmp_path_factory.mktemp("hf-model")
    tok = models.TinyLlama(n=32, cache_dir=cache_dir, corpus=essays).tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=32,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained_run(cache_dir, tmp_path_factory):
    """The default experiment, shortened, with the position-resolved perplexity at the end: one real run
    that the tests of the run, the token view, eval.py and the harness option all read."""
    from omegaconf import OmegaConf

    from lctw.training.stages import train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose([*SMALL, "eval=ppl"], cache=cache_dir)
    assert (cfg.scorer._target_, cfg.weighting._target_, cfg.context.method) == (
        "lctw.method.scorers.FrozenScorer", "lctw.method.weighting.Dense", "theta")
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as Hydra does for train.py runs
    return run_dir, train(cfg, run_dir=run_dir)


@pytest.fixture
def one_process_group(monkeypatch):
    """trainer=fsdp on one CPU rank runs in this process: Lightning initialises a process group and sets
    MASTER_ADDR/MASTER_PORT; both are undone afterwards so that no other test sees them."""
    import torch.distributed as dist

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hydra_conf():
    """Hydra initialized on conf/ once for a module that composes many configs (a tenth of a second each
    time otherwise); :func:`compose` then uses it."""
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        yield


def compose(overrides=(), cache=None, config_name="config"):
    """``config_name``: ``config`` (train.py), ``evaluate`` (eval.py) or ``score`` (score.py)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lctw.config  # noqa: F401  (registers the ${div:} resolver)

    overrides = [*overrides, *([f"paths.cache={cache}"] if cache else [])]
    if GlobalHydra.instance().is_initialized():  # by the hydra_conf fixture
        return hydra_compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
