"""fp32 master weights: one AdamW step at lr 2e-5 must change more than 99% of θ's parameters under every
shipped trainer config that runs on the CPU (bf16-mixed included). A bf16 model under bf16-mixed keeps no
fp32 copy, and most of its weights would not move (the update is below bf16's resolution)."""

import pytest
import torch
from conftest import SMALL, compose
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lctw.experiment import run
from lctw.models import TinyLlama

# the shortened default run, without the tiny model's base-stage keys and with no logger
RUN = [o for o in SMALL if not o.startswith(("+model.base", "logger."))]


@pytest.fixture(scope="module")
def hf_model(cache_dir, tmp_path_factory):
    """A small Llama with tied embeddings (every row of the embedding gets a gradient through the LM head),
    initialised like a pretrained model, N(0, 0.02), saved as a local Hugging Face model."""
    path = tmp_path_factory.mktemp("hf-model")
    tok = TinyLlama(n=32, cache_dir=cache_dir).tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=32,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


# ddp is the gpu config with strategy=ddp: the same precision; fsdp: one gloo rank, bf16 compute on fp32 shards
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "fsdp"])
def test_one_step_at_lr_2e5_moves_more_than_99_percent_of_the_weights(hf_model, cache_dir, tmp_path, trainer,
                                                                      one_process_group):
    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.gradient_checkpointing=false",
                 "scorer=none", "weighting=uniform", f"trainer={trainer}", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.max_steps=1", "trainer.accumulate_grad_batches=1",
                 "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "validate_first=false",
                 "callbacks=none", "optimizer.lr=2e-5", "scheduler=constant", "scheduler.num_warmup_steps=0",
                 "logger=none"]
    cfg = compose(overrides, cache=cache_dir)
    run(cfg, run_dir=tmp_path)
    before, after = load_file(hf_model / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(after[k].dtype == torch.float32 for k in after)  # fp32 masters, whatever the compute precision
    moved = sum(int((after[k] != before[k]).sum()) for k in before)
    total = sum(before[k].numel() for k in before)
    print(f"trainer={trainer}: {moved / total:.4f} of the weights moved")
    assert moved / total > 0.99, f"trainer={trainer}: {moved / total:.3f} of the weights moved"


def test_without_fp32_masters_most_weights_do_not_move(hf_model, cache_dir, tmp_path):
    """The control: the same step with the model loaded in bf16 (what model=hf did before)."""
    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.dtype=bfloat16",
                 "model.gradient_checkpointing=false", "scorer=none", "weighting=uniform", "trainer=gpu",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1",
                 "trainer.accumulate_grad_batches=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                 "validate_first=false", "callbacks=none", "optimizer.lr=2e-5", "scheduler=constant",
                 "scheduler.num_warmup_steps=0", "logger=none"]
    run(compose(overrides, cache=cache_dir), run_dir=tmp_path)
    before, after = load_file(hf_model / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    moved = sum(int((after[k].float() != before[k].to(torch.bfloat16).float()).sum()) for k in before)
    share = moved / sum(v.numel() for v in before.values())
    print(f"bf16 model under bf16-mixed: {share:.4f} of the weights moved")
    assert share < 0.5
