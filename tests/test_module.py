"""The LightningModule's diagnostics against hand-worked numbers and a direct computation."""

import math

import pytest
import torch
from conftest import tiny_llama

from lctw.data import collate
from lctw.method.scoring import model_logprobs
from lctw.method.weighting import Sparse, score_stats, weight_stats
from lctw.training.module import TokenWeightingLM


def stats(weights, mask, n):
    return {k: float(v) for k, v in weight_stats(torch.tensor(weights), torch.tensor(mask).bool(), n).items()}


def test_weight_stats_on_hand_worked_rows():
    # one row: ESS = (Σw)²/Σw²/M = 16/6/4; mass beyond n (targets 2, 3 of 4) = (1 + 2)/4
    s = stats([[0.0, 1, 1, 2]], [[1, 1, 1, 1]], n=2)
    assert s == pytest.approx(dict(weight_mean=1, weight_std=0.5**0.5, weight_max=2, weight_zero_frac=0.25,
                                   weight_ess=2 / 3, weight_mass_beyond_n=0.75))
    # ESS is the mean of the rows' ESS (0.25 and 1), not the pooled value (0.4)
    s = stats([[4.0, 0, 0, 0], [1, 1, 1, 1]], [[1, 1, 1, 1]] * 2, n=2)
    assert s["weight_ess"] == pytest.approx(0.625) and s["weight_mass_beyond_n"] == pytest.approx(0.25)
    # masked targets count nowhere (the 9 is padding)
    s = stats([[2.0, 2, 9, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 1, 1]], n=1)
    assert s["weight_mean"] == pytest.approx(4 / 3) and s["weight_ess"] == pytest.approx(1.0)
    assert s["weight_mass_beyond_n"] == pytest.approx(5 / 8) and s["weight_max"] == 2


def test_weight_stats_of_sparse_weights_are_k_over_m():
    mask = torch.ones(2, 127, dtype=torch.bool)
    w = Sparse(0.25)(torch.zeros(2, 127), -torch.rand(2, 127, generator=torch.Generator().manual_seed(0)), mask)
    s = {k: float(v) for k, v in weight_stats(w, mask, 32).items()}
    assert s["weight_ess"] == pytest.approx(31 / 127) and s["weight_zero_frac"] == pytest.approx(96 / 127)
    assert s["weight_max"] == pytest.approx(127 / 31)


def test_validation_split_at_n_equals_a_direct_computation(monkeypatch):
    """val/ce, val/ce_within_n (targets with at most n tokens before them) and val/ce_beyond_n are means
    over tokens, across batches of different token counts, and equal the NLL computed directly."""
    n = 8
    model = tiny_llama(layers=1)
    module = TokenWeightingLM(model, n=n)
    logged = {}
    monkeypatch.setattr(module, "log", lambda k, v, **kw: logged.__setitem__(k, float(v)))
    g = torch.Generator().manual_seed(0)
    ref = {"val/ce": [], "val/ce_within_n": [], "val/ce_beyond_n": []}
    j = torch.arange(19)
    with torch.no_grad():
        for i, lengths in enumerate(([20, 12], [20, 20])):
            ids = torch.randint(3, 64, (2, 20), generator=g)
            ids[:, 0] = 1
            batch = collate([{"input_ids": r, "length": length} for r, length in zip(ids, lengths, strict=True)])
            module.validation_step(batch, i)
            nll, mask = -model_logprobs(model, ids, None), batch["mask"]
            for key, sel in zip(ref, (mask, mask & (j < n), mask & (j >= n)), strict=True):
                ref[key].append(nll[sel])
    module.on_validation_epoch_end()
    for key, values in ref.items():
        assert logged[key] == pytest.approx(float(torch.cat(values).mean()), rel=1e-5), key
    assert [len(torch.cat(ref[k])) for k in ("val/ce_within_n", "val/ce_beyond_n")] == [32, 36]
    assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/ce"]))
    # the next epoch starts from zero: rows no longer than n have no beyond-n targets, and none is logged
    logged.clear()
    with torch.no_grad():
        ids = torch.randint(3, 64, (2, 9), generator=g)
        module.validation_step(collate([{"input_ids": r, "length": 9} for r in ids]), 0)
        expected = float(-model_logprobs(model, ids, None).mean())
    module.on_validation_epoch_end()
    assert "val/ce_beyond_n" not in logged and logged["val/ce"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("save", [False, True])
def test_theta0_is_a_frozen_submodule_left_out_of_checkpoints_unless_asked(save):
    from lctw.method.scorers import FrozenScorer

    theta = tiny_llama(layers=1)
    scorer = FrozenScorer(8, 32, save=save).use(tiny_llama(layers=1, seed=1))
    module = TokenWeightingLM(theta, scorer, n=8, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    assert any(name.startswith("scorer.model.") for name, _ in module.named_parameters())  # registered
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in theta.parameters()}  # θ0 is never in the optimizer
    module.train()
    assert theta.training and not scorer.model.training  # θ0 stays in eval mode
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith("scorer.") for k in checkpoint["state_dict"]) == save
    # resuming: the θ0 keys a checkpoint left out are taken from the scorer as set up; strict loading passes
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)


def test_score_stats_count_rows_whose_scores_are_all_zero():
    """LongCE's scores are signed: a row holding +0.5 and -0.5 sums to zero but is not a row without scores;
    masked targets count nowhere."""
    scores = torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]).bool()
    s = {k: float(v) for k, v in score_stats(scores, mask).items()}
    assert s == pytest.approx({"zero_score_rows": 2, "score_mean": 0.0})
