"""Train one configuration (or a sweep with -m) of lctw.

    python train.py                                          # the CPU default experiment
    python train.py -m weighting=dense,sparse scorer=frozen,self
    python train.py experiment=base                          # the base stage θ0, as a run of its own
    python train.py experiment=paper_llama3 trainer=gpu
    python train.py -m sweep=optuna_lam                      # Optuna minimises the returned `objective`
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lctw import threads
from lctw.runs.jobs import objective, run_job


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    threads.configure()  # before torch loads, also in a launcher's worker process (lctw/threads.py)
    from lctw.training.stages import train

    threads.follow(HydraConfig.get().runtime.output_dir)
    metrics = run_job(cfg, train)  # status.json in the run directory; a failed sweep job does not stop the sweep
    return objective(cfg, metrics)


if __name__ == "__main__":
    main()
