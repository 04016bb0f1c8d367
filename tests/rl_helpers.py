"""Helpers shared by the RL algorithm tests (tests/ is on sys.path through its conftest)."""
import torch

from dare.protocol import RolloutBatch


def rollout(ids, completion_width, advantages, completion_mask=None, attention_mask=None, seeds=None):
    """A RolloutBatch over ``ids`` (B, P + C): all completion tokens count, no padding,
    seeds 11, 12, ... unless given."""
    B, L = ids.shape
    cm = torch.ones(B, completion_width, dtype=torch.bool) if completion_mask is None else completion_mask
    am = torch.ones(B, L, dtype=torch.long) if attention_mask is None else attention_mask
    seeds = torch.arange(B) + 11 if seeds is None else seeds
    return RolloutBatch(ids, am, cm, torch.as_tensor(advantages, dtype=torch.float32), torch.zeros(B),
                        torch.zeros(B, dtype=torch.long), seeds, torch.zeros(B, completion_width, dtype=torch.long))
