"""Rebuild the 27 official BBH ``cot-prompts/<task>.txt`` files from the installed lm-eval's YAMLs.

    python tests/data/bbh_cot_prompts/reconstruct.py   # rewrites the .txt files next to this script

Why reconstructed: this project's machines cannot reach GitHub, but lm-eval ships the files' contents.
Its ``bbh/cot_fewshot/<task>.yaml`` holds each official exemplar as ``input`` and ``target`` rendered by
``doc_to_text: "Q: {{input}}\\nA: Let's think step by step.\\n"`` with ``target_delimiter: ""``, so
``Q: {input}\\nA: Let's think step by step.\\n{target}`` is the exemplar block of suzgunmirac/BIG-Bench-Hard
``cot-prompts/<task>.txt`` character for character, and its ``description`` (less the trailing blank line)
is the file's description, both of snarks' paragraphs included. What is *not* the official text: the
first line, which stands in for the files' canary string (both lm-eval's generator and
``lctw.eval.harness.parse_bbh_prompt`` drop everything up to the ``-----`` line), and the final newline.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval
import yaml

CANARY = "Canary line: the official cot-prompts files start with BIG-Bench's canary string here."
COT_FEWSHOT = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "cot_fewshot"


def cot_prompt(task: str) -> str:
    """The text of ``cot-prompts/<task>.txt`` (canary line stand-in, ``-----``, description, exemplars)."""
    config = yaml.safe_load((COT_FEWSHOT / f"{task}.yaml").read_text(encoding="utf-8"))
    description = config["description"].removesuffix("\n\n")
    samples = config["fewshot_config"]["samples"]
    blocks = [f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}" for s in samples]
    return "\n\n".join([f"{CANARY}\n-----\n{description}", *blocks]) + "\n"


def tasks() -> list[str]:
    return sorted(p.stem for p in COT_FEWSHOT.glob("*.yaml") if not p.stem.startswith("_"))


if __name__ == "__main__":
    out = Path(__file__).parent
    for task in tasks():
        (out / f"{task}.txt").write_text(cot_prompt(task), encoding="utf-8")
    print(f"wrote {len(tasks())} files to {out}")
