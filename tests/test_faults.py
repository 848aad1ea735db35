"""Numerical faults are caught, not trained on: each fault injected into a real Lightning run.

The policy (lctw/training/module): a step with non-finite log-probs, short log-probs, weights, loss or
gradients is skipped (no parameter changes) and counted; after ``max_skipped`` of them, or at the
first with ``policy=stop``, the run stops with a FloatingPointError naming the fault.
"""

import copy
import json

import lightning as L
import pytest
import torch
from conftest import SMALL, compose, tiny_llama
from torch.utils.data import DataLoader

from lctw.data import collate
from lctw.method.scorers import Scorer
from lctw.method.weighting import Dense, Weighting
from lctw.training.module import TokenWeightingLM
from lctw.training.stages import train

STEPS = 4


class NaNScorer(Scorer):
    """Short log-probs with NaN on some targets at the given steps (a corrupted θ' or cache)."""

    name = "nan"

    def __init__(self, n, max_len, at):
        super().__init__(n, max_len)
        self.at, self.calls = set(at), 0

    def forward(self, theta, batch, long_logprobs):
        self.calls += 1
        short = long_logprobs.detach() - 1.0
        if self.calls in self.at:
            short[:, 3] = float("nan")
        return short


class NaNWeighting(Weighting):
    def weights(self, long_lp, short_lp, mask):
        w = torch.ones_like(long_lp)
        w[:, 2] = float("inf")
        return w


def rows(count=STEPS * 2, t=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (count, t), generator=g)
    ids[:, 0] = 1
    return [{"input_ids": r, "length": t} for r in ids]


def fit(module, steps=STEPS, accumulate=1):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate)
    trainer.fit(module, train_dataloaders=DataLoader(rows(), batch_size=2, collate_fn=collate))
    return trainer


def module_with(scorer=None, weighting=None, **kwargs):
    torch.manual_seed(0)
    model = tiny_llama(layers=1).train()
    return TokenWeightingLM(model, scorer, weighting or Dense(0.5), n=8,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kwargs)


def params(module):
    return {k: v.detach().clone() for k, v in module.model.named_parameters()}


def changed(before, module):
    return {k for k, v in module.model.named_parameters() if not torch.equal(before[k], v.detach())}


@pytest.mark.integration
def test_nan_scores_skip_the_step_and_are_counted():
    clean = module_with(NaNScorer(8, 24, at=[]))
    fit(clean)
    module = module_with(NaNScorer(8, 24, at=[2]))
    fit(module)
    assert module.skipped_steps == 1 and clean.skipped_steps == 0
    # the faulty batch changed nothing: one fewer update than the clean run, so the weights differ
    assert changed(params(clean), module)
    for p in module.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.integration
def test_a_skipped_step_leaves_every_parameter_unchanged():
    module = module_with(NaNScorer(8, 24, at=[1, 2, 3, 4]), max_skipped=10)
    before = params(module)
    fit(module)
    assert module.skipped_steps == STEPS and not changed(before, module)


@pytest.mark.integration
def test_with_gradient_accumulation_a_faulty_micro_batch_skips_the_whole_step():
    """The window's other micro-batches must not update θ alone: nothing changes."""
    module = module_with(NaNScorer(8, 24, at=[1, 3]), max_skipped=10)  # the first micro-batch of each window
    before = params(module)
    fit(module, steps=2, accumulate=2)
    assert module.skipped_steps == 2 and not changed(before, module)
    clean = module_with(NaNScorer(8, 24, at=[]))
    fit(clean, steps=2, accumulate=2)
    assert changed(before, clean)  # the same windows without faults do train


@pytest.mark.integration
def test_too_many_faults_stop_the_run_with_the_fault_named():
    module = module_with(NaNScorer(8, 24, at=[1, 2, 3]), max_skipped=1)
    with pytest.raises(FloatingPointError, match=r"non-finite short log-probs at step \d.*nonfinite\.max_skipped=1"):
        fit(module)
    module = module_with(NaNScorer(8, 24, at=[2]), nonfinite="stop")
    with pytest.raises(FloatingPointError, match="non-finite short log-probs.*policy=stop"):
        fit(module)


@pytest.mark.integration
def test_nan_weights_and_nan_log_probs_are_faults():
    module = module_with(NaNScorer(8, 24, at=[]), NaNWeighting(), max_skipped=10)
    before = params(module)
    fit(module)
    assert module.skipped_steps == STEPS and not changed(before, module)
    # NaN in θ's own log-probs (its hidden states), injected at one step
    module = module_with(NaNScorer(8, 24, at=[]), max_skipped=10)
    calls = {"n": 0}

    def poison(mod, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out

    module.model.model.norm.register_forward_hook(poison)
    fit(module)
    assert module.skipped_steps == 1


@pytest.mark.integration
def test_non_finite_gradients_are_dropped_before_the_optimizer():
    module = module_with(NaNScorer(8, 24, at=[]), max_skipped=10)
    weight = module.model.model.layers[0].mlp.up_proj.weight
    weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # finite loss, infinite gradient
    before = params(module)
    fit(module)
    assert module.skipped_steps == STEPS and not changed(before, module)


def test_checkpoints_are_never_written_with_non_finite_weights():
    module = module_with(NaNScorer(8, 24, at=[]))
    with torch.no_grad():
        module.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not saving a checkpoint"):
        module.on_save_checkpoint({"state_dict": copy.copy(module.state_dict())})


def test_theta_is_never_exported_with_non_finite_weights(tmp_path):
    from lctw.models.theta import save_theta

    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(FloatingPointError, match="not exporting θ"):
        save_theta(model, None, tmp_path / "hf", None)
    assert not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_a_diverging_run_exits_with_an_error_and_leaves_no_model(cache_dir, tmp_path):
    """optimizer.lr=1e6 on the default experiment (shortened): the run stops, writes no hf/, and any
    metrics it writes are strict JSON."""
    cfg = compose([*SMALL, "optimizer.lr=1e6", "trainer.max_steps=8", "nonfinite.max_skipped=2"], cache=cache_dir)
    with pytest.raises(FloatingPointError, match="non-finite|not finite"):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.rglob("*nan*.ckpt"))  # no "best" checkpoint of a diverged model
    for f in tmp_path.rglob("*metrics*.json"):
        assert "NaN" not in f.read_text() and "Infinity" not in f.read_text(), f


def test_metrics_json_is_strict(tmp_path):
    from lctw.runs.jobs import write_metrics

    write_metrics(tmp_path / "m.json", {"val/ce": float("nan"), "train/loss": 1.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"train/loss": 1.5, "val/ce": None}


@pytest.mark.integration
def test_fp16_overflow_steps_belong_to_the_gradient_scaler():
    """precision=16-mixed: each micro-batch backpropagates a sum over its targets, so the scaled fp16
    gradients overflow until the scaler has halved its scale enough. Those steps are the scaler's to skip,
    not faults: the run trains on, and the scaler ends lower than it started. (A CPU GradScaler with a
    huge initial scale forces the overflows that a GPU run sees in its first ~15 steps.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lctw.method.scorers import SelfScorer

    module = module_with(SelfScorer(8, 24), max_skipped=2)
    before = params(module)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, train_dataloaders=DataLoader(rows(count=40), batch_size=2, collate_fn=collate))
    assert module.skipped_steps == 0 and scaler.get_scale() < 2.0**24  # it overflowed, and it was not a fault
    assert changed(before, module)  # and then trained
