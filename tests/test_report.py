"""The sweep report on a fabricated miniature sweep: known metrics in, hand-computed means, stds and paired
tests out, from the local directory and from the same runs served by a stand-in for W&B's network API."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from lctw.runs.loggers import flat_config
from lctw.runs.report import FAMILIES, configurations, main, paired, wandb_runs
from lctw.runs.report.tables import config_columns

WEIGHTINGS = {
    "uniform": ({"_target_": "lctw.method.weighting.Uniform"},
                {"_target_": "lctw.method.scorers.NoScorer", "n": 32}, "none"),
    "dense": ({"_target_": "lctw.method.weighting.Dense", "lam": 0.75},
              {"_target_": "lctw.method.scorers.FrozenScorer", "n": 32, "mode": "chunked"}, "frozen"),
    "sparse": ({"_target_": "lctw.method.weighting.Sparse", "kappa": 0.25, "lam": 0.0, "seed": "${seed}"},
               {"_target_": "lctw.method.scorers.FrozenScorer", "n": 32, "mode": "chunked"}, "frozen"),
}
# (weighting, seed) -> CE within n, CE beyond n, recall accuracy at 64 and 128 tokens, per-step ESS
RUNS = {
    ("uniform", 0): (5.0, 5.1, 0.10, 0.00, [1.0, 1.0]),
    ("uniform", 1): (5.1, 5.2, 0.20, 0.10, [1.0]),
    ("uniform", 2): (5.2, 5.6, 0.30, 0.20, [1.0, 1.0, 1.0]),
    ("dense", 0): (5.1, 5.0, 0.20, 0.10, [0.5, 0.7]),
    ("dense", 1): (5.1, 5.2, 0.20, 0.30, [0.6]),
    ("dense", 2): (5.4, 5.4, 0.50, 0.20, [0.6, 0.6, 0.9]),
    ("sparse", 0): (5.3, 5.3, 0.00, 0.00, [0.25]),
    ("sparse", 1): (5.5, 5.3, 0.10, 0.00, [0.25]),
}


def fabricate(sweep: Path) -> list[dict]:
    """A sweep directory as train.py -m leaves it, plus one failed job; returns what W&B would hold."""
    served = []
    for num, ((weighting, seed), (within, beyond, r64, r128, ess)) in enumerate(RUNS.items()):
        job = sweep / f"{num}_weighting={weighting},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        w_cfg, s_cfg, scorer = WEIGHTINGS[weighting]
        config = {"seed": seed, "n": 32, "N": 128, "weighting": w_cfg, "scorer": s_cfg,
                  "context": {"_target_": "lctw.method.context.ContextExtension", "method": "theta"},
                  "paths": {"cache": f"/tmp/cache{seed}"}, "name": None, "optimizer": {"lr": 1e-3}}
        OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
        choices = {"weighting": weighting, "scorer": scorer, "context": "theta", "hydra/launcher": "basic"}
        OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), job / ".hydra" / "hydra.yaml")
        (job / "status.json").write_text(json.dumps({"status": "completed"}))
        metrics = {"val/ce_within_n": within, "val/ce_beyond_n": beyond, "eval/recall/acc/64": r64,
                   "eval/recall/acc/128": r128, "eval/ce/0-32": within, "eval/ce/32-64": beyond, "train/loss": 9.0}
        (job / "metrics.json").write_text(json.dumps(metrics))
        rng = np.random.default_rng(seed)
        samples = {"scores": rng.exponential(size=50) if weighting != "uniform" else np.full(50, np.nan),
                   "weights": rng.uniform(0, 2, 50), "positions": rng.integers(1, 128, 50),
                   "step_ess": np.asarray(ess), "step_mass_beyond_n": np.full(len(ess), 0.75)}
        np.savez(job / "token_weights.npz", **samples)
        served.append({"name": job.name, "config": flat_config(OmegaConf.to_container(
            OmegaConf.create(config), resolve=True), {k: v for k, v in choices.items() if "/" not in k}),
            "summary": metrics, "samples": samples})
    failed = sweep / "8_weighting=sparse,seed=2"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps({"status": "failed", "error": "FloatingPointError"}))
    return served


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep")
    served = fabricate(path)
    return path, served, main([str(path), "--tradeoff", "val/ce_within_n", "eval/recall/acc/128"])


def test_table_has_one_row_per_configuration_with_hand_computed_means_and_stds(sweep):
    path, _, out = sweep
    table = pd.read_csv(out / "report.csv", index_col=0)
    # one row per configuration, named by the weighting, its parameters and what else varies; uniform first
    assert list(table.index) == ["uniform scorer=none", "dense lam=0.75 scorer=frozen",
                                 "sparse lam=0.0 kappa=0.25 scorer=frozen"]  # the failed job is left out
    table.index = ["uniform", "dense", "sparse"]
    assert list(table["seeds"]) == [3, 3, 2]
    assert table.loc["dense", "weighting.lam"] == 0.75 and table.loc["sparse", "weighting.kappa"] == 0.25
    assert table.loc["dense", "scorer"] == "frozen" and table.loc["uniform", "scorer"] == "none"
    assert (table["n"] == 32).all() and (table["N"] == 128).all() and (table["context"] == "theta").all()
    # dense, CE beyond n: 5.0, 5.2, 5.4 -> 5.2 ± 0.2; uniform: 5.1, 5.2, 5.6 -> 5.3 ± sqrt(0.07)
    assert table.loc["dense", "val/ce_beyond_n mean"] == pytest.approx(5.2)
    assert table.loc["dense", "val/ce_beyond_n std"] == pytest.approx(0.2)
    assert table.loc["uniform", "val/ce_beyond_n std"] == pytest.approx(math.sqrt(0.07))
    # sparse, recall at 64: 0.0, 0.1 -> 0.05 ± sqrt(0.005); within n: 5.3, 5.5 -> 5.4 ± sqrt(0.02)
    assert table.loc["sparse", "eval/recall/acc/64 mean"] == pytest.approx(0.05)
    assert table.loc["sparse", "eval/recall/acc/64 std"] == pytest.approx(math.sqrt(0.005))
    assert table.loc["sparse", "val/ce_within_n std"] == pytest.approx(math.sqrt(0.02))
    # ESS averaged over each run's training steps (0.6, 0.6, 0.7), then over seeds: 0.6333 ± 0.0577
    assert table.loc["dense", "train/weight_ess_mean mean"] == pytest.approx(1.9 / 3)
    assert table.loc["dense", "train/weight_ess_mean std"] == pytest.approx(math.sqrt(1 / 300))
    assert "train/loss mean" not in table  # not in a metric family
    assert "optimizer.lr" not in table and "paths.cache" not in table  # constant, and never a configuration key
    assert "scorer.mode" not in table  # one value where it exists (uniform's scorer=none has no mode)
    md = (out / "report.md").read_text()
    assert "8_weighting=sparse,seed=2 (failed)" in md
    assert "| dense | 0.75 |" in md and "5.2000 ± 0.2000" in md


def test_paired_comparison_against_uniform_on_the_same_seeds(sweep):
    _, _, out = sweep
    pairs = pd.read_csv(out / "paired.csv")
    pairs["configuration"] = pairs["configuration"].str.split().str[0]
    pairs = pairs.set_index(["configuration", "metric"])
    dense = pairs.loc[("dense", "val/ce_beyond_n")]
    # differences -0.1, 0.0, -0.2: mean -0.1, std 0.1, t = -sqrt(3); with 2 degrees of freedom the two-sided
    # p-value is 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(3/5); sign test: 0 higher, 2 lower -> p = 2 * 0.5^2
    assert dense["baseline"] == "uniform scorer=none" and dense["pairs"] == 3
    assert dense["diff mean"] == pytest.approx(-0.1) and dense["diff std"] == pytest.approx(0.1)
    assert dense["t"] == pytest.approx(-math.sqrt(3))
    assert dense["p (t)"] == pytest.approx(1 - math.sqrt(3 / 5))
    assert (dense["higher"], dense["lower"], dense["p (sign)"]) == (0, 2, pytest.approx(0.5))
    sparse = pairs.loc[("sparse", "eval/recall/acc/64")]  # seeds 0 and 1 only: -0.1, -0.1
    assert sparse["pairs"] == 2 and sparse["diff mean"] == pytest.approx(-0.1)
    assert sparse["diff std"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(sparse["t"])  # no spread: no t statistic
    assert ("uniform", "val/ce_beyond_n") not in pairs.index
    assert not any(m.startswith("train/") for m in pairs.index.get_level_values("metric"))


def test_plots_are_written(sweep):
    _, _, out = sweep
    for name in ("length_eval_recall_acc", "position_ce", "histograms", "tradeoff"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name}.png)" in (out / "report.md").read_text()


class FakeApi:
    """W&B's public API as lctw.runs.report uses it, over fixed records: only the network layer is replaced."""

    def __init__(self, served):
        self.served, self.calls = served, []

    def runs(self, path, filters):
        self.calls.append((path, filters))
        return [FakeRun(r) for r in self.served]


class FakeRun:
    def __init__(self, record):
        self.name, self.state, self.config = record["name"], "finished", record["config"]
        self.summary_metrics, self._samples = record["summary"], record["samples"]

    def file(self, name):
        samples = self._samples

        class File:
            def download(self, root, replace):
                np.savez(Path(root) / name, **samples)

        return File()


def test_a_wandb_group_gives_the_same_table(sweep, tmp_path):
    path, served, out = sweep
    api = FakeApi(served)
    runs, left_out = wandb_runs("me/lctw/sweep-1", api)
    assert api.calls == [("me/lctw", {"group": "sweep-1"})] and left_out == []
    per_run, table = configurations(runs, FAMILIES)
    table.to_csv(tmp_path / "report.csv")  # through CSV like the local one, so that the dtypes compare equal
    local, remote = pd.read_csv(out / "report.csv", index_col=0), pd.read_csv(tmp_path / "report.csv", index_col=0)
    pd.testing.assert_frame_equal(local, remote)
    pairs = paired(per_run, ["val/ce_beyond_n"], config_columns(runs))
    local_pairs = pd.read_csv(out / "paired.csv")
    pd.testing.assert_frame_equal(local_pairs[local_pairs["metric"] == "val/ce_beyond_n"].reset_index(drop=True),
                                  pairs.reset_index(drop=True), check_dtype=False)


def test_learning_curves_are_tabulated_plotted_and_paired_at_every_step(tmp_path):
    """Curve points ``<metric>@<step>``: mean ± std per configuration and step, and configuration − uniform
    with the same seed at each step (dense gains 0.5 more than uniform at step 10 in every seed, nothing at 0)."""
    from lctw.runs.report import report

    fabricate(tmp_path)
    for job in tmp_path.iterdir():
        if not (job / "metrics.json").exists():
            continue
        weighting, seed = job.name.split("_", 1)[1].replace("weighting=", "").split(",seed=")
        metrics = json.loads((job / "metrics.json").read_text())
        lift = {"uniform": 0.0, "dense": 0.5, "sparse": -1.0}[weighting]
        metrics.update({"eval/copy/random/gain_beyond_n@0": 1.0, "eval/copy/random/gain_beyond_n@10": 3.0 + int(seed)
                        + lift, "eval/copy/prose_ce_within_n@0": 5.0, "eval/copy/prose_ce_within_n@10": 5.0 + lift})
        (job / "metrics.json").write_text(json.dumps(metrics))
    out = report(str(tmp_path), tmp_path / "report", curves=["eval/copy/random/gain_beyond_n",
                                                              "eval/copy/prose_ce_within_n"])
    pairs = pd.read_csv(out / "paired.csv").set_index(["configuration", "metric"])
    dense, sparse = "dense lam=0.75 scorer=frozen", "sparse lam=0.0 kappa=0.25 scorer=frozen"
    at10 = pairs.loc[(dense, "eval/copy/random/gain_beyond_n@10")]
    assert (at10["pairs"], at10["diff mean"], at10["diff std"], at10["higher"]) == (3, 0.5, 0.0, 3)
    assert pairs.loc[(sparse, "eval/copy/random/gain_beyond_n@10"), "pairs"] == 2
    assert pairs.loc[(dense, "eval/copy/random/gain_beyond_n@0"), "diff mean"] == 0.0
    text = (out / "report.md").read_text()
    section = text.split("## Learning curves")[1].split("\n## ")[0]
    assert "### eval/copy/random/gain_beyond_n" in section and "| configuration | seeds | step 0 | step 10 |" in section
    assert "| uniform scorer=none | 3 | 1.000 ± 0.000 | 4.000 ± 1.000 |" in section
    assert f"| {dense} | +0.000 ± 0.000 (p –, 0/0) | +0.500 ± 0.000 (p –, 3/0) |" in section  # std 0: no t-test
    assert "@10" not in text.split("## Learning curves")[0] and (out / "curves.png").exists()
    assert (out / "learning_curves.png").exists()  # the first curve beside the second minus uniform's
    assert "![curves](curves.png)" in text
