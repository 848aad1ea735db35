"""fp32 master weights: one AdamW step at lr 2e-5 must change more than 99% of θ's parameters under every
shipped trainer config that runs on the CPU (bf16-mixed included). A bf16 model under bf16-mixed keeps no
fp32 copy, and most of its weights would not move (the update is below bf16's resolution)."""

import pytest
import torch
from conftest import RUN, compose
from safetensors.torch import load_file

from lctw.training.stages import train


# ddp and fsdp run on one gloo rank here; fsdp computes in bf16 over fp32 shards
@pytest.mark.integration
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_one_step_at_lr_2e5_moves_more_than_99_percent_of_the_weights(hf_model, cache_dir, tmp_path, trainer,
                                                                      one_process_group):
    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.gradient_checkpointing=false",
                 "scorer=none", "weighting=uniform", f"trainer={trainer}", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.max_steps=1", "trainer.accumulate_grad_batches=1",
                 "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "validate_first=false",
                 "callbacks=none", "optimizer.lr=2e-5", "scheduler=constant", "scheduler.num_warmup_steps=0",
                 "logger=none"]
    cfg = compose(overrides, cache=cache_dir)
    train(cfg, run_dir=tmp_path)
    before, after = load_file(hf_model / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(after[k].dtype == torch.float32 for k in after)  # fp32 masters, whatever the compute precision
    moved = sum(int((after[k] != before[k]).sum()) for k in before)
    total = sum(before[k].numel() for k in before)
    print(f"trainer={trainer}: {moved / total:.4f} of the weights moved")
    assert moved / total > 0.99, f"trainer={trainer}: {moved / total:.3f} of the weights moved"


@pytest.mark.integration
def test_without_fp32_masters_most_weights_do_not_move(hf_model, cache_dir, tmp_path):
    """The control: the same step with the model loaded in bf16 (what model=hf did before)."""
    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.dtype=bfloat16",
                 "model.gradient_checkpointing=false", "scorer=none", "weighting=uniform", "trainer=gpu",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1",
                 "trainer.accumulate_grad_batches=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
                 "validate_first=false", "callbacks=none", "optimizer.lr=2e-5", "scheduler=constant",
                 "scheduler.num_warmup_steps=0", "logger=none"]
    train(compose(overrides, cache=cache_dir), run_dir=tmp_path)
    before, after = load_file(hf_model / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    moved = sum(int((after[k].float() != before[k].to(torch.bfloat16).float()).sum()) for k in before)
    share = moved / sum(v.numel() for v in before.values())
    print(f"bf16 model under bf16-mixed: {share:.4f} of the weights moved")
    assert share < 0.5
