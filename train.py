"""Train one configuration (or a sweep with -m) of lctw.

    python train.py                                          # the CPU default experiment
    python train.py -m weighting=dense,sparse scorer=frozen,self
    python train.py experiment=base                          # the base stage θ0, as a run of its own
    python train.py experiment=paper_llama3 trainer=gpu
    python train.py -m sweep=optuna_lam                      # Optuna minimises the returned `objective`
"""

# ruff: noqa: E402 - the thread policy is decided before torch loads (lctw/threads.py)
from lctw import threads

threads.configure()

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lctw.runs.jobs import objective, run_job
from lctw.training.stages import train


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    threads.follow(HydraConfig.get().runtime.output_dir)  # the thread count, followed; threads.json
    metrics = run_job(cfg, train)  # status.json in the run directory; a failed sweep job does not stop the sweep
    return objective(cfg, metrics)


if __name__ == "__main__":
    main()
