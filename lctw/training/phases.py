"""A run in phases: the same run continued with other rows and batches (``phases`` in a recipe).

    python train.py experiment=base_copy      # the copying base: rows of 32 tokens, then rows of n

Why: a tiny model forms its in-context copying circuit far sooner on short rows with a large batch, and
must then learn the positions up to n; the measured recipe (``conf/experiment/base_copy.yaml``) switches
from one to the other after the circuit has formed. Each phase is an ordinary :func:`lctw.training.experiment.run`
of the recipe with the phase's deltas merged in (``data.max_len``, ``data.batch_size``, ``trainer.max_steps``,
...; a key the recipe does not have is refused), chained through the run directory: phase k > 0 starts
from phase k − 1's θ (``model.init`` = its ``hf/``). One learning-rate schedule spans them all: every
phase gets ``scheduler.num_training_steps`` = the steps of all phases and ``scheduler.start_step`` = the
steps before it (``scheduler=wsd``). The optimizer's moments start afresh in each phase. Only the last
phase evaluates (``eval``); earlier phases run in ``<run dir>/phases/<k>``, the last in the run directory
itself, so a phased run leaves what any run leaves (``hf/``, ``metrics.json``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lctw.errors import ConfigError


def phase_dirs(run_dir: Path, count: int) -> list[Path]:
    return [run_dir / "phases" / str(k) for k in range(count - 1)] + [run_dir]


def phase_configs(cfg: DictConfig, run_dir: Path) -> list[DictConfig]:
    """The composed config of every phase of ``cfg`` (which has ``phases``), in order."""
    phases = OmegaConf.to_container(cfg.phases, resolve=False)
    if not isinstance(phases, list) or not phases or not all(isinstance(p, dict) for p in phases):
        raise ConfigError(f"phases={phases!r}: allowed a non-empty list of config deltas, one per phase")
    if "start_step" not in cfg.get("scheduler", {}):
        raise ConfigError("phases need one schedule over all of them: allowed scheduler=wsd (its start_step is set "
                          "per phase)")
    if "init" not in cfg.model:
        raise ConfigError("phases need a model that starts from the previous phase's θ (model.init): allowed "
                          "model=tiny")
    recipe = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "phases"])
    OmegaConf.set_struct(recipe, True)
    configs = []
    for k, delta in enumerate(phases):
        try:
            phase = OmegaConf.merge(recipe, delta)
        except Exception as err:  # noqa: BLE001 - omegaconf's errors for a key the recipe lacks
            raise ConfigError(f"phases[{k}]: {str(err).splitlines()[0]} (a phase sets keys the recipe has)") from None
        if phase.trainer.max_steps < 1:
            raise ConfigError(f"phases[{k}].trainer.max_steps={phase.trainer.max_steps} is out of range: allowed >= 1")
        configs.append(phase)
    total = sum(int(p.trainer.max_steps) for p in configs)
    dirs, start = phase_dirs(run_dir, len(configs)), 0
    for k, phase in enumerate(configs):
        with open_dict(phase):
            phase.scheduler.num_training_steps, phase.scheduler.start_step = total, start
            if k:
                phase.model.init = str(dirs[k - 1] / "hf")
            if k < len(configs) - 1:
                phase.eval = None
        start += int(phase.trainer.max_steps)
    return configs
