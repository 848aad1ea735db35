"""Planted facts (data.facts) and the recall evaluation (eval=recall), on the local tokenizer and real essays."""

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from lctw.config import ConfigError, build
from lctw.data import LongDocuments, essays
from lctw.data.facts import Facts, all_keys, all_values
from lctw.eval.recall import Recall
from lctw.models import TinyLlama

STATEMENT = re.compile(r"The secret number of (\w+) is (\d \d \d \d)\.")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return TinyLlama(n=32, cache_dir=cache_dir, corpus=essays).tokenizer()


def test_planted_statements_sit_where_recorded_at_their_distances_and_the_prose_keeps_its_order(tokenizer):
    facts = Facts(rate=12, min_distance=40, max_distance=120)
    prose = list(range(5000, 5400))  # ids no statement uses: every prose token is recognisable
    rng = random.Random(0)
    seen = 0
    for _ in range(50):
        ids, planted, used = facts.plant(prose, 255, tokenizer, "train", rng)
        assert len(ids) == 255
        statements = set()
        for key, value, first, second, offset in planted:
            stmt, value_offset = facts.statement(tokenizer, key, value)
            assert ids[first : first + len(stmt)] == stmt == ids[second : second + len(stmt)]
            assert 40 <= second - first <= 120 and offset == value_offset
            assert tokenizer.decode(stmt[offset : offset + 4]).strip() == value  # the value is its 4 digit tokens
            statements |= set(range(first, first + len(stmt))) | set(range(second, second + len(stmt)))
        assert [t for i, t in enumerate(ids) if i not in statements] == prose[:used]  # the prose, in order, uncut
        assert len({k for k, *_ in planted}) == len(planted)  # keys distinct within a chunk
        seen += len(planted)
    assert seen > 50 * 255 * 12 / 1000 * 0.9  # few placements fail at this density


def test_the_rate_is_facts_per_thousand_tokens(tokenizer):
    facts = Facts(rate=4, min_distance=200, max_distance=800)
    rng = random.Random(1)
    counts = [len(facts.plant(list(range(5000, 6000)), 1000, tokenizer, "train", rng)[1]) for _ in range(300)]
    assert sum(counts) / len(counts) == pytest.approx(4, abs=0.35)


def test_held_out_keys_and_values_are_disjoint_from_training_and_the_same_in_every_run():
    a, b = Facts(), Facts(rate=1, held_out=0.2)
    assert not set(a.keys("train")) & set(a.keys("heldout"))
    assert not set(a.values("train")) & set(a.values("heldout"))
    assert sorted(a.keys("train") + a.keys("heldout")) == sorted(all_keys())
    assert len(a.values("heldout")) == 2000 and len(all_values()) == 10_000
    assert a.keys("heldout") == b.keys("heldout") and a.values("heldout") == b.values("heldout")


def test_the_validation_split_states_only_held_out_facts_and_the_train_split_only_training_ones(tokenizer, cache_dir):
    facts = dict(rate=10, min_distance=100, max_distance=250)
    dm = LongDocuments(max_len=256, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=12, val_fraction=0.2,
                       facts=facts)
    dm.setup()
    reference = Facts(**facts)
    for split, rows, name in (("train", dm.train_set, "train"), ("heldout", dm.val_set, "validation")):
        found = [m for ids in rows["input_ids"] for m in STATEMENT.findall(tokenizer.decode(ids))]
        assert found, f"no statement in the {name} split"
        assert {k for k, _ in found} <= set(reference.keys(split))
        assert {v for _, v in found} <= set(reference.values(split))
    assert {int(x) for x in dm.train_set["length"]} == {256}
    again = LongDocuments(max_len=256, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=12, val_fraction=0.2,
                          facts=facts)
    again.setup()
    assert torch.equal(again.train_set[:]["input_ids"], dm.train_set[:]["input_ids"])  # the same planting every time


@pytest.mark.parametrize("facts, match", [
    ({"rate": -1}, "data: facts.rate=-1"), ({"min_distance": 50, "max_distance": 10}, "facts.min_distance=50"),
    ({"held_out": 1.0}, "facts.held_out=1.0"), ({"speed": 1}, "speed"),
])
def test_bad_facts_options_are_named(facts, match):
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "lctw.data.LongDocuments", "max_len": 64, "facts": facts})
    with pytest.raises(ConfigError, match=match):
        build(node, "data")


class Induction(torch.nn.Module):
    """A copying model that sees ``window`` tokens back: it predicts the token that followed the latest
    earlier occurrence of the last three tokens (an induction head, written out), else a uniform guess."""

    def __init__(self, vocab: int, window: int):
        super().__init__()
        self.vocab, self.window = vocab, window
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        b, t = input_ids.shape
        v = self.vocab
        tri = torch.full((b, t), -1, dtype=torch.long)
        tri[:, 2:] = input_ids[:, :-2] * v * v + input_ids[:, 1:-1] * v + input_ids[:, 2:]
        pos = torch.arange(t)
        earlier = (pos[None, :] < pos[:, None]) & (pos[:, None] - pos[None, :] < self.window) & (pos[None, :] >= 2)
        logits = torch.zeros(b, t, v)
        for i in range(b):
            match = (tri[i][:, None] == tri[i][None, :]) & earlier
            j = torch.where(match, pos[None, :], -1).max(dim=1).values
            hit = j >= 0
            logits[i, hit, input_ids[i, (j[hit] + 1).clamp(max=t - 1)]] = 20.0
        return SimpleNamespace(logits=logits)


def test_recall_tells_a_model_that_copies_within_n_from_one_that_copies_beyond(tokenizer, cache_dir, tmp_path):
    dm = LongDocuments(max_len=256, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=12, val_fraction=0.2)
    recall = Recall(samples=6, batch_size=6, prose_sequences=2)
    vocab = len(tokenizer)
    short = recall(Induction(vocab, window=64), tokenizer, tmp_path / "short", datamodule=dm, n=64, N=256)
    long = recall(Induction(vocab, window=256), tokenizer, tmp_path / "long", datamodule=dm, n=64, N=256)
    for m in (short, long):  # the whole value is copied within n: exact match, near-zero CE, a large gain
        assert m["eval/recall/acc_within_n"] == 1.0
        assert m["eval/recall/ce_within_n"] < 1e-3 and m["eval/recall/gain_within_n"] > 20
    assert long["eval/recall/acc_beyond_n"] == 1.0 and long["eval/recall/gain_beyond_n"] > 20
    assert short["eval/recall/acc_beyond_n"] == 0.0 and short["eval/recall/gain_beyond_n"] == 0.0
    assert short["eval/recall/ce_beyond_n"] == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), rel=1e-4)
    assert {"eval/recall/ce@64-128", "eval/recall/acc@128-192"} <= set(long)
    assert (tmp_path / "long" / "recall.csv").exists() and (tmp_path / "long" / "recall.json").exists()


def test_the_study_sweep_runs_each_configuration_once_per_seed_at_equal_steps_and_tokens(hydra_conf):
    from conftest import compose
    from hydra import compose as hydra_compose

    sweep = hydra_compose(config_name="config", overrides=["sweep=mini_repro"], return_hydra_config=True)
    params = sweep.hydra.sweeper.params
    assert params.experiment == "mini_repro" and params.seed.split(",") == ["0", "1", "2"]
    report = sweep.hydra.callbacks.summary.report  # the study ends in its report (lctw.runs.jobs.SweepSummary)
    assert list(report.curves)[0] == "eval/copy/random/gain_beyond_n" and "eval/copy/prose_ce_within_n" in report.curves
    arms = params.arm.split(",")
    runs = set()
    for arm in arms:
        cfg = compose(["experiment=mini_repro", f"arm={arm}"])
        kind = cfg.weighting._target_.rsplit(".", 1)[1].lower()
        scorer = cfg.scorer._target_.rsplit(".", 1)[1] if cfg.get("scorer") else None
        param = cfg.weighting.get("lam") if kind == "dense" else cfg.weighting.get("kappa")
        runs.add((kind, param if kind != "uniform" else None, scorer))
        assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.N, cfg.n) == (150, 2, 512, 128)  # equal compute
        assert list(cfg.callbacks.curve.steps) == [0, 25, 50, 100, 150]  # the learning curve, the same for all
        # copies and facts restated at all distances up to N; the base: the copying recipe, refused if it cannot
        assert cfg.data.copies.get("max_distance") is None and cfg.data.facts.max_distance == cfg.N
        base = cfg.model.base
        assert (base.experiment, base.eval, base.min_copy_gain) == ("base_copy", "copy", 2)
    assert len(runs) == len(arms) == 9  # uniform once, without a scorer
    assert ("uniform", None, "NoScorer") in runs
    assert {r for r in runs if r[0] != "uniform"} == {
        (k, p, s) for k, ps in (("dense", (0.25, 0.75)), ("sparse", (0.1, 0.25))) for p in ps
        for s in ("FrozenScorer", "SelfScorer")}


@pytest.mark.integration
def test_runs_carry_the_within_n_recall_of_their_base_and_warn_when_it_cannot_copy(tmp_path, caplog):
    """The base stage measures θ0's within-n recall (model.base.eval, as experiment=mini_repro sets it);
    every run on that base reports it as base/eval/recall/*, and warns when θ0 does not copy."""
    from conftest import RUN, compose

    from lctw.training import base
    from lctw.training.stages import train

    cfg = compose([*RUN, "n=96", "+model.base.trainer.max_steps=6", "+model.base.data.batch_size=4",
                   "+model.base.eval=recall", "logger=csv", "callbacks=none"], cache=str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="lctw.training.base"):
        metrics = train(cfg, run_dir=tmp_path / "run")
    (built,) = (tmp_path / "cache" / "tiny").glob("*/metrics.json")
    measured = json.loads(built.read_text())
    assert measured["eval/recall/acc_within_n"] == 0.0 and "eval/recall/gain_beyond_n" not in measured  # N = n
    for key in ("eval/recall/gain_within_n", "eval/recall/ce_within_n", "val/ce"):
        assert metrics[f"base/{key}"] == measured[key]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["base/eval/recall/gain_within_n"] == \
        measured["eval/recall/gain_within_n"]
    assert "θ0 does not copy within n" in caplog.text
    caplog.clear()
    built.write_text(json.dumps({**measured, "eval/recall/gain_within_n": 9.0}))  # as a base that copies
    with caplog.at_level("INFO", logger="lctw.training.base"):
        assert base.prepare(instantiate(cfg.model))["base/eval/recall/gain_within_n"] == 9.0
    assert "does not copy" not in caplog.text and "gain 9.000" in caplog.text


def test_recall_probes_too_short_for_their_statements_name_the_n_they_need(tokenizer):
    with pytest.raises(ValueError, match=r"probes of 40 tokens cannot hold .* use n >= \d+ \(tokens\)"):
        Recall(samples=4).probes(tokenizer, list(range(5000)), Facts(), 40, 24, 24, random.Random(0))
