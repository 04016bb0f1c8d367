"""Turning rollout workers' generations into one RolloutBatch for the learners."""
from __future__ import annotations

import torch

from dare.protocol import GenerationOutput, PromptBatch, RolloutBatch


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, C) bool: True up to and including the first EOS of each row (all if none)."""
    is_eos = completions == eos_id
    after_first = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return ~after_first


def merge_generations(prompts: list[PromptBatch], outputs: list[GenerationOutput], pad_id: int):
    """Left-pad every worker's (prompt + completion) rows to one prompt width.

    Returns input_ids (B, P + C), attention_mask (B, P + C), completions (B, C),
    unmask_step (B, C), total nfe.
    """
    width = max(p.input_ids.shape[1] for p in prompts)
    ids, masks, comps, steps = [], [], [], []
    for p, out in zip(prompts, outputs):
        pw = p.input_ids.shape[1]
        b = out.sequences.shape[0]
        pad = width - pw
        prompt_mask = p.attention_mask if p.attention_mask is not None else torch.ones_like(p.input_ids)
        completion = out.sequences[:, pw:]
        ids.append(torch.cat([torch.full((b, pad), pad_id, dtype=torch.long), out.sequences], dim=1))
        masks.append(torch.cat([torch.zeros((b, pad), dtype=torch.long), prompt_mask.long(),
                                torch.ones_like(completion)], dim=1))
        comps.append(completion)
        steps.append(out.unmask_step)
    return (torch.cat(ids), torch.cat(masks), torch.cat(comps), torch.cat(steps), sum(o.nfe for o in outputs))


def rollout_batch(input_ids, attention_mask, completions, unmask_step, eos_id, rewards, advantages,
                  group_ids, noise_seeds) -> RolloutBatch:
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        completion_mask=completion_mask(completions, eos_id),
        advantages=torch.as_tensor(advantages, dtype=torch.float32),
        rewards=torch.as_tensor(rewards, dtype=torch.float32),
        group_ids=torch.as_tensor(group_ids, dtype=torch.long),
        noise_seeds=torch.as_tensor(noise_seeds, dtype=torch.long),
        unmask_step=unmask_step,
    )


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous near-equal [start, stop) ranges covering n items."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out
