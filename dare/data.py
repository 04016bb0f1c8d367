"""Tokenising prompt/response rows, the training data order, and batch collation.

Rows are encoded as LLaDA's SFT guidelines describe: the chat template applied to the
prompt (with the generation prompt), then the response and <EOS>, then <EOS> padding up
to ``max_length``. Padding to a fixed length keeps every micro-batch's input independent
of which rows share it, so the loss does not depend on the number of learner workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dare.protocol import PromptBatch, TokenBatch


def prompt_text(tokenizer, prompt) -> str:
    """The prompt as the model sees it: chat template (with generation prompt) if it has one."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in prompt)


def encode_prompt(tokenizer, prompt) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False).input_ids


@dataclass
class Encoded:
    ids: list[int]
    prompt_length: int


def encode_pairs(rows: list[dict], tokenizer, max_length: int, eos_id: int) -> list[Encoded]:
    """Encode prompt + response + <EOS>; truncate the response to fit; drop rows whose
    prompt alone does not leave room for one response token."""
    out = []
    for row in rows:
        if row.get("response") is None:
            raise ValueError("supervised rows need a 'response'; this split has none")
        prompt = encode_prompt(tokenizer, row["prompt"])
        response = tokenizer(row["response"], add_special_tokens=False).input_ids + [eos_id]
        if len(prompt) + 1 > max_length:
            continue
        out.append(Encoded((prompt + response)[:max_length], len(prompt)))
    return out


def encode_units(data_format: str, rows: list[dict], tokenizer, max_length: int, eos_id: int) -> list[list[Encoded]]:
    """Rows -> training units: ``[[prompt+response]]`` for "sft", ``[[chosen], [rejected]]``
    rows for "preference" (both with the same prompt; a pair is dropped if either side is)."""
    if data_format == "sft":
        return [[e] for e in encode_pairs(rows, tokenizer, max_length, eos_id)]
    if data_format == "preference":
        units = []
        for row in rows:
            missing = [k for k in ("prompt", "chosen", "rejected") if row.get(k) is None]
            if missing:
                raise ValueError(f"preference rows need prompt, chosen and rejected; missing {missing}")
            pair = encode_pairs([{"prompt": row["prompt"], "response": row["chosen"]},
                                 {"prompt": row["prompt"], "response": row["rejected"]}],
                                tokenizer, max_length, eos_id)
            if len(pair) == 2:
                units.append(pair)
        return units
    raise ValueError(f"unknown data_format {data_format!r} (sft, preference)")


def collate_units(units: list[list[Encoded]], max_length: int, pad_id: int, run_seed: int, step: int) -> TokenBatch:
    """Flatten units into one TokenBatch; row k of the batch gets noise seed row_seed(run_seed, step, k)."""
    items = [e for unit in units for e in unit]
    return collate(items, max_length, pad_id, [row_seed(run_seed, step, k) for k in range(len(items))])


def collate(items: list[Encoded], max_length: int, pad_id: int, seeds: list[int]) -> TokenBatch:
    """Right-pad with ``pad_id`` (LLaDA: <EOS>) to ``max_length``; padding is trained on."""
    B = len(items)
    ids = torch.full((B, max_length), pad_id, dtype=torch.long)
    prompt_lengths = torch.tensor([it.prompt_length for it in items], dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
    positions = torch.arange(max_length)[None]
    loss_mask = positions >= prompt_lengths[:, None]
    return TokenBatch(ids, prompt_lengths, torch.ones_like(ids), loss_mask,
                      torch.tensor(seeds, dtype=torch.long))


def left_pad(prompts: list[list[int]], pad_id: int) -> PromptBatch:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return PromptBatch(ids, None if bool(mask.all()) else mask)


def row_seed(run_seed: int, step: int, index: int) -> int:
    """Noise seed of row ``index`` of the global batch of ``step``."""
    return (run_seed * 1_000_003 + step * 65_537 + index) % (2**62)


class DataOrder:
    """Which rows form the global batch of each step: a fresh seeded permutation per epoch.

    The order is a pure function of (seed, step), so a resumed run sees exactly the
    batches an uninterrupted run would.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        if n_rows < batch_size:
            raise ValueError(f"only {n_rows} training rows for a global batch of {batch_size}")
        self.n, self.bs, self.seed = n_rows, batch_size, seed
        self.per_epoch = n_rows // batch_size

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[k * self.bs:(k + 1) * self.bs].tolist()
