"""A sharded checkpoint (``trainer=fsdp``) as a Hugging Face model directory that ``eval.py`` accepts.

    python -m lctw.training.consolidate <run dir>/checkpoints/last.ckpt <out dir>
    python eval.py ckpt=<out dir> eval=ruler

One process, no GPU and no process group: θ is built from the run config in the checkpoint's
``meta.pt`` (architecture and context extension, no weights), every file of the checkpoint is verified
against its SHA-256, θ's tensors are read from the shards (``torch.distributed.checkpoint`` reshards
them to this single process; the optimizer's states and θ' are not read) and saved with
:func:`lctw.models.theta.save_theta`: ``config.json`` with the extended RoPE, the tokenizer and ``lctw.yaml``.
It needs host memory for θ once (float32: 4 bytes per parameter). ``eval.py ckpt=<checkpoint dir>``
also reads a sharded checkpoint directly, the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from lctw.models.theta import load_theta, save_theta
    from lctw.runs.checkpoints import is_sharded

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_sharded(checkpoint):
        raise SystemExit(f"{checkpoint} is not a sharded checkpoint (a directory with meta.pt, written by "
                         "trainer=fsdp); a .ckpt file is read by eval.py as it is")
    model, tokenizer, config = load_theta(str(checkpoint))
    save_theta(model, tokenizer, out_dir, OmegaConf.to_container(config, resolve=True))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lctw.training.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a sharded checkpoint directory, e.g. <run dir>/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    args = parser.parse_args(argv)
    print(f"θ written to {consolidate(args.checkpoint, args.out_dir)}")


if __name__ == "__main__":
    main()
