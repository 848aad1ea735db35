"""The copying base's machinery: one schedule over phases (scheduler=wsd), runs in phases chained through
θ (phases, model.init), the refusal of a base that does not copy (model.base.min_copy_gain), and learning
curves during training (callbacks=curve)."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import RUN, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lctw.errors import ConfigError
from lctw.training import base
from lctw.training.curve import LearningCurve
from lctw.training.phases import phase_configs
from lctw.training.schedule import WarmupStableDecay


def test_the_schedule_warms_up_stays_constant_then_decays_to_its_floor():
    s = WarmupStableDecay(num_warmup_steps=10, num_training_steps=100, decay_fraction=0.25, final_lr_ratio=0.1)
    assert [s.factor(k) for k in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.factor(10) == s.factor(50) == s.factor(75) == 1.0  # constant until 75% of the steps
    assert s.factor(87.5) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert s.factor(100) == pytest.approx(0.1) and s.factor(99) > 0.1


def test_a_later_phase_continues_the_schedule_where_the_earlier_one_stopped():
    whole = WarmupStableDecay(10, 100)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = WarmupStableDecay(10, 100, start_step=60)(optimizer)
    seen = []
    for _ in range(40):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * whole.factor(60 + k) for k in range(40)])


@pytest.mark.parametrize("options, match", [
    ({"start_step": 100}, r"start_step=100 is out of range"), ({"decay_fraction": 1.5}, r"decay_fraction=1\.5"),
    ({"num_training_steps": 0}, r"num_training_steps=0"),
])
def test_bad_schedules_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        WarmupStableDecay(**{"num_warmup_steps": 10, "num_training_steps": 100, **options})


def test_the_copying_base_recipe_is_two_phases_under_one_schedule(hydra_conf, tmp_path):
    cfg = compose(["experiment=base_copy", "n=128"])
    first, second = phase_configs(cfg, tmp_path)
    assert (first.data.max_len, first.data.batch_size, first.trainer.max_steps) == (32, 32, 3000)
    assert (second.data.max_len, second.data.batch_size, second.trainer.max_steps) == (128, 16, 1500)
    for phase, start in ((first, 0), (second, 3000)):
        assert (phase.scheduler.num_training_steps, phase.scheduler.start_step) == (4500, start)
        assert (phase.optimizer.lr, phase.optimizer.weight_decay, phase.scheduler.num_warmup_steps) == (3e-3, 0.1, 100)
        assert dict(phase.data.mixture) == {"plain": 0.25, "facts": 0.10, "repeats": 0.10, "copies": 0.55}
    assert first.model.init is None and second.model.init == str(tmp_path / "phases" / "0" / "hf")
    assert first.data.facts.max_distance == 16 and second.data.facts.max_distance == 112
    assert "phases" not in first and "phases" not in second


@pytest.mark.parametrize("overrides, match", [
    (["phases=[{trainer:{max_stepz:3}}]"], r"phases\[0\]: Key 'max_stepz' is not in struct"),
    (["phases=[{trainer:{max_steps:0}}]"], r"phases\[0\]\.trainer\.max_steps=0 is out of range"),
    (["scheduler=cosine"], r"phases need one schedule over all of them: allowed scheduler=wsd"),
])
def test_bad_phases_are_refused_before_anything_runs(overrides, match, hydra_conf, tmp_path):
    with pytest.raises(ConfigError, match=match):
        phase_configs(compose(["experiment=base_copy", *overrides]), tmp_path)


@pytest.mark.integration
def test_a_phased_run_chains_its_phases_through_theta_and_one_schedule(tmp_path):
    """The real thing, shrunk: two phases of 3 steps (rows of 16, then of 32 tokens), each a run."""
    from lctw.training.stages import train

    phases = ("phases=[{data:{max_len:16,batch_size:4,val_batch_size:4,facts:{max_distance:16}},trainer:{max_steps:3}},"
              "{data:{max_len:32,batch_size:4,val_batch_size:4},trainer:{max_steps:3}}]")
    cfg = compose(["experiment=base_copy", "n=32", phases, "scheduler.num_warmup_steps=2", "+data.max_docs=8",
                   "trainer.limit_val_batches=1", "logger=csv"], cache=str(tmp_path / "cache"))
    metrics = train(cfg, run_dir=tmp_path / "run")
    first, second = tmp_path / "run" / "phases" / "0", tmp_path / "run"
    assert (first / "hf" / "config.json").exists() and (second / "hf" / "config.json").exists()
    saved = OmegaConf.load(second / "hf" / "lctw.yaml")
    assert saved.model.init == str(first / "hf") and saved.scheduler.start_step == 3
    assert OmegaConf.load(first / "hf" / "lctw.yaml").data.max_len == 16 and saved.data.max_len == 32
    assert metrics["train/lr"] == pytest.approx(3e-3 * WarmupStableDecay(2, 6).factor(5))  # the last of 6 steps
    assert json.loads((second / "metrics.json").read_text())["val/ce"] == metrics["val/ce"]


def _bound_base(tmp_path, measured: dict | None, **base_options):
    """A tiny spec bound to a base directory whose metrics.json holds ``measured`` (as if built)."""
    spec = instantiate(compose(["n=64", *[f"+model.base.{k}={v}" for k, v in base_options.items()]],
                               cache=str(tmp_path)).model)
    spec.bind("fake")
    spec.path.mkdir(parents=True)
    if measured is not None:
        (spec.path.parent / "metrics.json").write_text(json.dumps(measured))
    return spec


def test_a_base_that_does_not_copy_is_refused_with_its_figure(hydra_conf, tmp_path):
    measured = {"eval/copy/random/gain_within_n": 0.004, "eval/copy/random/gain_within_n_sem": 0.002,
                "eval/copy/random/acc_within_n": 0.0, "val/ce": 5.0}
    spec = _bound_base(tmp_path / "a", measured, min_copy_gain=2.0)
    with pytest.raises(ConfigError, match=r"model\.base\.min_copy_gain=2\.0: θ0 does not copy within n \(gain 0\.004 "
                                          r"± 0\.002 nats per copied token, exact match 0\.00"):
        base.base_metrics(spec)
    copying = _bound_base(tmp_path / "b", {**measured, "eval/copy/random/gain_within_n": 8.8}, min_copy_gain=2.0)
    assert base.base_metrics(copying)["base/eval/copy/random/gain_within_n"] == 8.8
    unmeasured = _bound_base(tmp_path / "c", {"val/ce": 5.0}, min_copy_gain=2.0)
    with pytest.raises(ConfigError, match=r"has no eval/copy/random/gain_within_n .* model\.base\.eval=copy"):
        base.base_metrics(unmeasured)
    assert base.base_metrics(_bound_base(tmp_path / "d", measured)) == {  # no minimum: reported, not refused
        f"base/{k}": v for k, v in measured.items()}


def test_the_study_refuses_to_train_on_a_base_that_does_not_copy(tmp_path, monkeypatch):
    """Before the fine-tuning run: nothing of the run is built once the base is found wanting."""
    from lctw.training import stages

    monkeypatch.setattr(stages, "run", lambda *a, **k: pytest.fail("the run started"))  # the base stage still runs
    cfg = compose(["experiment=mini_repro", "arm=uniform", "+model.base.phases=[{trainer:{max_steps:2}}]",
                   "+model.base.trainer.limit_val_batches=1"],
                  cache=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"θ0 does not copy within n \(gain -?0\.0\d\d"):
        stages.train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_learning_curve_records_the_evaluation_at_its_steps(tmp_path):
    from lctw.training.stages import train

    cfg = compose([*RUN, "n=48", "N=192", "+model.base.trainer.max_steps=6", "+model.base.data.batch_size=4",
                   "callbacks=curve", "callbacks.curve.steps=[0,2,3]", "callbacks.curve.evaluation.samples=2",
                   "callbacks.curve.evaluation.kinds=[random,prose]", "logger=csv"], cache=str(tmp_path / "cache"))
    metrics = train(cfg, run_dir=tmp_path / "run")
    for step in (0, 2, 3):
        for key in ("random/gain_within_n", "prose/gain_beyond_n", "random/acc_beyond_n", "prose_ce_within_n"):
            assert math.isfinite(metrics[f"eval/copy/{key}@{step}"])
    assert "eval/copy/random/gain_beyond_n@1" not in metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["eval/copy/prose_ce_within_n@3"] == metrics["eval/copy/prose_ce_within_n@3"]
    logged = next(Path(tmp_path / "run").rglob("metrics.csv")).read_text()
    assert "eval/copy/random/gain_beyond_n@2" in logged


def test_a_learning_curve_needs_an_evaluation_that_measures():
    with pytest.raises(ValueError, match=r"evaluation=object has no measure"):
        LearningCurve(object(), [0, 10], 32, 128)
    with pytest.raises(ValueError, match=r"steps=\[\] is out of range"):
        LearningCurve(None, [], 32, 128)
