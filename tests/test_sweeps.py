"""Sweeps and launchers: the SLURM and submitit launchers, the sweep presets (conf/sweep/), W&B sweep
files (sweeps/*.yaml) and Optuna. Cheap composition checks run in CI; the real multiruns (submitit's
local executor with a requeued job, a 2-trial Optuna study) are slow-marked."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, SMALL, compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lctw.config import TRAIN_KEYS, ConfigError, build, check_keys, check_lengths, check_ranges
from lctw.runs.jobs import objective
from lctw.training.trainer import check_trainer

PRESETS = sorted(p.stem for p in Path(CONF, "sweep").glob("*.yaml"))
WANDB_SWEEPS = sorted(Path(ROOT, "sweeps").glob("*.yaml"))
GROUPS = {p.name for p in Path(CONF).iterdir() if p.is_dir()}
# shorter still than SMALL: one optimizer step, one validation batch, no checkpoints
QUICK = [*SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
         "validate_first=false", "callbacks=none"]


@pytest.fixture(autouse=True)
def _hydra(hydra_conf):
    """Hydra initialized once for the module: this module composes many configs."""


def _hydra_compose(overrides):
    """The config with its `hydra` node, as a multirun's launcher and sweeper see it."""
    from hydra import compose as hydra_compose

    return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _check_job(cfg, values=()):
    """A job's config once the sweep's values (key, typed value) are set: its keys exist and its types
    and values are allowed (lctw.config's checks that need no weights)."""
    cfg = cfg.copy()
    for key, value in values:
        assert OmegaConf.select(cfg, key, default=None) is not None, f"no config key {key}"
        OmegaConf.update(cfg, key, value, merge=False)
    check_keys(cfg, TRAIN_KEYS)
    check_ranges(cfg)
    check_trainer(cfg, machine=False)
    check_lengths(cfg)
    for key in ("weighting", "scorer", "context"):
        build(cfg[key], key)
    instantiate(cfg.optimizer)
    return cfg


def _values(key, value):
    """The typed values a sweep takes for one key: every choice, or an interval's two ends."""
    (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
    if override.is_discrete_sweep():
        return list(override.sweep_iterator(transformer=Transformer.identity))
    if override.is_interval_sweep():
        return [override.value().start, override.value().end]
    return [override.value()]


def _split(params):
    """Group choices (composed) and key values (set on the composed config), as lists per key."""
    values = {key: _values(key, value) for key, value in params.items()}
    return ({k: v for k, v in values.items() if k in GROUPS}, {k: v for k, v in values.items() if k not in GROUPS})


def _check_preset_jobs(base, params):
    """Every group option of the sweep composes with the base overrides and every key value is valid."""
    groups, keys = _split(params)
    for group, options in groups.items():
        for option in options:
            assert Path(CONF, group, f"{option}.yaml").exists(), f"{group}={option} is not an option"
    cfg = compose([*base, *(f"{g}={o[0]}" for g, o in groups.items())])
    for group, options in groups.items():  # the chosen option is the part that runs (as named by the part)
        if group not in ("scorer", "weighting", "context"):
            continue  # experiment, arm: deltas of other keys, not parts
        part = build(cfg[group], group)
        assert (part.method if group == "context" else part.name) == options[0]
    for key, vs in keys.items():
        for v in vs:
            _check_job(cfg, [(key, v)])
    return cfg


def test_slurm_launcher_renders_the_sbatch_script(tmp_path):
    """hydra/launcher=slurm: one task per GPU on each node, requeue on preemption, USR2 before the limit."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    cfg = _hydra_compose(["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=8", "++trainer.num_nodes=4",
                          "hydra.launcher.partition=gpu", "hydra.launcher.account=lab"])
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    params = launcher.params
    assert (params["tasks_per_node"], params["gpus_per_node"], params["nodes"]) == (8, 8, 4)
    assert params["max_num_timeout"] > 0  # requeued after a timeout: the job resumes from last.ckpt
    # the launcher's own mapping of its parameters onto sbatch's (hydra_submitit_launcher's launch())
    renamed = SlurmExecutor._equivalence_dict()
    sbatch = {renamed.get(k, k): v for k, v in params.items() if k not in ("submitit_folder", "max_num_timeout")}
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path, **sbatch)
    for line in ("--partition=gpu", "--account=lab", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                 f"--signal=USR2@{params['signal_delay_s']}", "--requeue", "--time=1440"):
        assert f"#SBATCH {line}\n" in script, line
    # nodes falls back to 1 where the trainer config has no num_nodes
    assert _hydra_compose(["hydra/launcher=slurm", "hydra.launcher.partition=p"]).hydra.launcher.nodes == 1


@pytest.mark.parametrize("trainer", ["trainer=ddp", "trainer=fsdp", "trainer=gpu trainer.devices=auto"])
def test_slurm_launcher_refuses_all_gpus_before_submitting(trainer):
    """trainer=ddp and trainer=fsdp default to devices=-1 (every GPU), which rendered ``--ntasks-per-node=-1``:
    the launcher's parameters are resolved when Hydra instantiates it, before anything is submitted."""
    from omegaconf.errors import InterpolationResolutionError

    cfg = _hydra_compose(["hydra/launcher=slurm", *trainer.split(), "hydra.launcher.partition=gpu"])
    with pytest.raises(InterpolationResolutionError, match=r"ConfigError .*trainer\.devices=(-1|auto) with "
                       r"hydra/launcher=slurm: .*hydra\.launcher\.tasks_per_node.*allowed an int >= 1"):
        instantiate(cfg.hydra.launcher)
    cfg = _hydra_compose(["hydra/launcher=slurm", *trainer.split(), "trainer.devices=4",
                          "hydra.launcher.partition=gpu"])
    params = instantiate(cfg.hydra.launcher).params
    assert (params["tasks_per_node"], params["gpus_per_node"]) == (4, 4)


def test_submitit_local_launcher_composes():
    cfg = _hydra_compose(["hydra/launcher=submitit_local"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "LocalLauncher" and launcher.params["tasks_per_node"] == 1


@pytest.mark.parametrize("preset", PRESETS)
def test_every_value_of_a_sweep_preset_is_a_valid_job(preset):
    """The preset's parameter names are config keys or groups and each value it takes (an interval: both
    ends) is allowed, alone and with the paper's recipe (the sweep group comes after experiment)."""
    params = OmegaConf.load(Path(CONF, "sweep", f"{preset}.yaml")).hydra.sweeper.params
    assert params, f"sweep={preset} has no hydra.sweeper.params"
    _check_preset_jobs([f"sweep={preset}"], params)
    if "experiment" in params:
        return  # the preset is its own recipe (mini_repro)
    # 8 GPUs named: the recipe's trainer.devices=-1 counts the GPUs, and this machine has none
    recipe = _check_preset_jobs([f"sweep={preset}", "experiment=paper_llama3", "trainer.devices=8"], params)
    assert recipe.model._target_ == "lctw.models.HFModel" and recipe.N == 32768


def test_optuna_preset_selects_the_sweeper_and_the_objective():
    cfg = _hydra_compose(["sweep=optuna_lam"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.objective == "val/ce_beyond_n"
    same = _hydra_compose(["hydra/sweeper=optuna", "sweep=optuna_lam"])  # the spelling
    assert same.hydra.sweeper == cfg.hydra.sweeper


def test_objective_is_the_configured_metric_or_none():
    cfg = compose(["objective=val/ce_beyond_n"])
    assert objective(cfg, {"val/ce": 2.0, "val/ce_beyond_n": 3.0}) == 3.0
    assert objective(cfg, None) is None  # a failed run: Optuna records a failed trial
    assert objective(cfg, {"val/ce": 2.0}) is None  # missing
    assert objective(cfg, {"val/ce_beyond_n": math.nan}) is None  # a NaN would stop an Optuna study
    with pytest.raises(ConfigError, match="objective=ce_beyond_n is not a metric name"):
        check_ranges(compose(["objective=ce_beyond_n"]))


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.name)
def test_wandb_sweep_commands_are_valid_train_commands(path):
    """`wandb agent` runs `command:` with the sampled parameters as `key=value` (args_no_hyphens): built
    here as the agent builds it (wandb.wandb_agent.Agent._command_run), for each parameter's extremes."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    config = sweep_utils.load_sweep_config(str(path))
    assert config["program"] == "train.py" and config["method"] in ("random", "bayes", "grid")
    assert config["metric"]["name"].startswith("val/") and config["metric"]["goal"] in ("minimize", "maximize")
    params = config["parameters"]
    ranges = {k: p["values"] if "values" in p else [p["value"]] if "value" in p else [p["min"], p["max"]]
              for k, p in params.items()}
    assert {"weighting.lam", "weighting.kappa", "n", "optimizer.lr"} <= set(ranges)
    for i in range(2):  # every parameter at its low end, then at its high end
        args = {k: {"value": v[0] if i == 0 else v[-1]} for k, v in ranges.items()}
        sweep_vars = sweep_utils.create_sweep_command_args({"args": args})
        sweep_vars.update(interpreter=["python"], program=[config["program"]], env=["/usr/bin/env"])
        command = []
        for chunk in sweep_utils.create_sweep_command(list(config["command"])):
            chunk = str(chunk)
            command += sweep_vars.get(chunk[2:-1]) or [] if chunk.startswith("${") else [chunk]
        assert command[:3] == ["/usr/bin/env", "python", "train.py"]
        overrides = OverridesParser.create().parse_overrides(command[3:])  # as train.py's Hydra parses them
        assert [o.get_key_element() for o in overrides] == list(args)
        groups = [f"{o.get_key_element()}={o.value()}" for o in overrides if o.get_key_element() in GROUPS]
        keys = [(o.get_key_element(), o.value()) for o in overrides if o.get_key_element() not in GROUPS]
        assert all(value == args[key]["value"] for key, value in keys)  # e.g. 1e-04 reads back as a float
        _check_job(compose(groups), keys)


def test_a_nested_composition_keeps_the_job_name():
    """The tiny base is composed inside a running job (lctw.training.base): the job keeps its name, hence its log
    file (train.log), also when submitit pickles Hydra's state to requeue the job."""
    from hydra.core.utils import JobRuntime

    from lctw.training.base import compose as base_compose

    runtime = JobRuntime.instance()
    before = runtime.get("name")
    runtime.set("name", "train")
    try:
        base_compose(["experiment=base"])
        assert runtime.get("name") == "train"
    finally:
        runtime.set("name", before)


def _env(cache_dir):
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "LCTW_CACHE": cache_dir, "HYDRA_FULL_ERROR": "1"}


def _wandb_runs(job):
    return sorted(job.glob("wandb/offline-run-*/*.wandb"))


@pytest.mark.slow
def test_submitit_local_multirun_with_a_requeued_job(cache_dir, tmp_path):
    """Two jobs through submitit's local executor, in the default sweep directory. Job 0 is signalled as
    SLURM signals a preempted or timed-out job (USR2) once it has a checkpoint: submitit requeues it, and
    the restarted job runs in the same run directory, resumes from last.ckpt and finishes."""
    steps = 40
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "-m", "hydra/launcher=submitit_local",
           "weighting.lam=0.5,0.25", *SMALL, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           "checkpoint_every=2", "trainer.limit_val_batches=1", "validate_first=false", f"paths.cache={cache_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 600
    job0 = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("outputs/multirun/*/0_*/checkpoints/last.ckpt.sha256"))
        if found:
            job0 = found[0].parent.parent
            pid = json.loads((job0 / "status.json").read_text())["pid"]
            os.kill(pid, signal.SIGUSR2)
            break
        time.sleep(0.05)
    out = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
    assert job0 is not None, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    (sweep,) = tmp_path.glob("outputs/multirun/*")
    summary = json.loads((sweep / "summary.json").read_text())
    assert [j["status"] for j in summary] == ["completed", "completed"]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(jobs) == 2 and job0 in jobs  # the requeued job finished in its own run directory
    submitit_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert "Requeued job" in submitit_logs
    log = (job0 / "train.log").read_text()
    assert "resuming from" in log and str(job0 / "checkpoints" / "last.ckpt") in log
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert math.isfinite(metrics["val/ce"]) and metrics["train/loss"] > 0
        assert _wandb_runs(job) and all(sweep.name.encode() in run.read_bytes() for run in _wandb_runs(job))
    # the requeued job continues its W&B run: two offline segments, one run id
    run_id = (job0 / "wandb" / "run_id").read_text().strip()
    assert len(_wandb_runs(job0)) == 2 and all(run.name == f"run-{run_id}.wandb" for run in _wandb_runs(job0))


@pytest.mark.slow
def test_optuna_study_of_two_trials(cache_dir, tmp_path):
    """sweep=optuna_lam: two real trials minimise val/ce_beyond_n; the study lives in SQLite."""
    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    cmd = [sys.executable, "train.py", "-m", "sweep=optuna_lam", "hydra.sweeper.n_trials=2",
           f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=tiny", *QUICK,
           "trainer.max_steps=2", "trainer.val_check_interval=2", f"paths.cache={cache_dir}",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(jobs) == 2
    values = [json.loads((job / "metrics.json").read_text())["val/ce_beyond_n"] for job in jobs]
    lams = [OmegaConf.load(job / ".hydra" / "config.yaml").weighting.lam for job in jobs]
    assert all(_wandb_runs(job) and all(sweep.name.encode() in run.read_bytes() for run in _wandb_runs(job))
               for job in jobs)  # every trial's W&B run is in the sweep's group
    assert len(set(lams)) == 2 and all(0 <= lam <= 1 for lam in lams)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(values)
    assert result["best_params"]["weighting.lam"] == lams[values.index(min(values))]
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    assert sorted(t.value for t in study.trials) == sorted(values)


@pytest.mark.slow
def test_a_failed_trial_does_not_stop_the_optuna_study(cache_dir, tmp_path):
    """A trial whose config is refused is recorded as failed; the other trial completes and is the best."""
    sweep = tmp_path / "sweep"
    # Optuna's random sampler with seed 0 draws 2.0 (refused: lam is in [0, 1]), then 0.5
    cmd = [sys.executable, "train.py", "-m", "sweep=optuna_lam", "hydra/sweeper/sampler=random",
           "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.params={weighting.lam:'choice(0.5,2.0)'}", *QUICK, f"paths.cache={cache_dir}",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep reports its failed job, after the study
    summary = {j["job"].split("_")[0]: j for j in json.loads((sweep / "summary.json").read_text())}
    assert sorted(j["status"] for j in summary.values()) == ["completed", "failed"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"weighting.lam": 0.5}
    assert "weighting.lam=2.0 is out of range" in summary["0"]["error"]
