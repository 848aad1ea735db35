"""Batched greedy generation's one shared step: prompts of different lengths padded on the left, so
that every prompt ends where generation starts (RULER and LongBench both generate this way)."""

from __future__ import annotations


def left_padded(prompts: list[list[int]], tokenizer, device):
    """(input_ids, attention_mask, pad id) for token-id ``prompts``: pad is the tokenizer's pad token, else
    its EOS, else 0; masked out by the attention mask, so its value never matters."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, pad
