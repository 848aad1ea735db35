"""Evaluate a run, a checkpoint or any Hugging Face model (RULER, position-resolved perplexity).

    python eval.py ckpt=outputs/runs/2026-11-28/12-00-00 eval=ruler eval.lengths=[1024,2048] eval.samples=50
    python eval.py ckpt=meta-llama/Meta-Llama-3-8B eval=ruler eval.lengths=[4096,8192] eval.samples=500 dtype=bfloat16
    python eval.py ckpt=<run dir> eval=ppl
"""

# ruff: noqa: E402 - the thread policy is decided before torch loads (lctw/threads.py)
from lctw import threads

threads.configure()

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lctw.eval.evaluate import evaluate
from lctw.runs.jobs import run_job


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    threads.follow(HydraConfig.get().runtime.output_dir)  # the thread count, followed; threads.json
    run_job(cfg, evaluate)


if __name__ == "__main__":
    main()
