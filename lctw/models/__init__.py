"""Models: specs that are data plus a loader, and the one function that builds θ.

* :mod:`.specs`    ``HFModel`` (any causal LM by hub name or local path) and ``TinyLlama`` (a small Llama
  whose θ0 the base stage builds, :mod:`lctw.training.base`); the tiny model's BPE tokenizer.
* :mod:`.smollm2`  SmolLM2-135M-Instruct from the packaged GGUF weights.
* :mod:`.theta`    build θ from a spec and a context extension, save it, load a run or checkpoint.

May import: :mod:`lctw.method` (context extension), :mod:`lctw.runs.checkpoints` (checkpoint files) and
:mod:`lctw.errors`. A spec never imports training, data, scorers, weightings, Hydra or the config layer.
"""

from lctw.models.specs import ATTENTION, DTYPES, HFModel, TinyLlama, bpe_tokenizer, is_local_path

__all__ = ["ATTENTION", "DTYPES", "HFModel", "TinyLlama", "bpe_tokenizer", "is_local_path"]
