"""Fill the score cache: run a frozen scorer once over the tokenized train data (lctw/cache/).

Same configuration and overrides as train.py, plus the ``score.*`` options of conf/score.yaml::

    python score.py scorer=frozen                           # θ0's short-context log-probs
    python score.py scorer=small score.batch_size=16        # the small scorer's
    python train.py -m scorer=frozen scorer.cache=true weighting.lam=0.5,0.75   # read them, θ0 not loaded

Resumable: an interrupted run (or one stopped by ``score.limit``) continues after its last saved shard.
Prints the cache directory.
"""

# ruff: noqa: E402 - the thread policy is decided before torch loads (lctw/threads.py)
from lctw import threads

threads.configure()

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lctw.config  # noqa: F401 - registers the resolvers conf/score.yaml names (${run_token:} in hydra.run.dir)
from lctw.cache.fill import fill_cache
from lctw.runs.jobs import run_job


@hydra.main(config_path="conf", config_name="score", version_base="1.3")
def main(cfg: DictConfig) -> None:
    threads.follow(HydraConfig.get().runtime.output_dir)  # the thread count, followed; threads.json
    run_job(cfg, fill_cache)


if __name__ == "__main__":
    main()
