"""The quickstart's synthetic task, tokenizer and model, all made in code (no downloads).

Tasks: ``sort`` (default): a string of ``length`` random digits; the answer is the digits in
ascending order. ``sums``: "a+b" with a, b in [0, max_operand]; the answer is the sum.
Train and held-out problems are disjoint (the held-out set is drawn first from its own
seed and its questions are excluded from training).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

CHARS = list("0123456789+-*=() ")
SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|mdm_mask|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _draw(task: str, rng: random.Random, max_operand: int, length: int) -> tuple[str, str]:
    if task == "sums":
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return f"{a}+{b}", str(a + b)
    if task == "sort":
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        return digits, "".join(sorted(digits))
    raise ValueError(f"unknown quickstart task {task!r} (sort, sums)")


def problems(task: str, split: str, size: int, max_operand: int = 99, length: int = 6,
             heldout_size: int = 256) -> list[tuple[str, str]]:
    """(question, answer) pairs; the held-out set is drawn first and excluded from training."""
    held_rng, seen, heldout = random.Random(1), set(), []
    while len(heldout) < heldout_size:
        q, a = _draw(task, held_rng, max_operand, length)
        if q not in seen:
            seen.add(q)
            heldout.append((q, a))
    if split == "heldout":
        return heldout[:size]
    rng, out = random.Random(0), []
    while len(out) < size:
        q, a = _draw(task, rng, max_operand, length)
        if q not in seen:
            out.append((q, a))
    return out


def rows(split: str, task: str = "sort", size: int = 20000, max_operand: int = 99, length: int = 6,
         limit: int | None = None) -> list[dict]:
    """Dataset ``load``: rows {"prompt": [user message], "response", "ground_truth"}."""
    if split not in ("train", "heldout"):
        raise ValueError(f"synthetic: unknown split {split!r} (train, heldout)")
    n = min(size, limit) if limit else size
    return [{"prompt": [{"role": "user", "content": q}], "response": a, "ground_truth": a}
            for q, a in problems(task, split, n, max_operand, length)]


def make_tokenizer(folder: Path):
    """A character-level fast tokenizer with LLaDA-style special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mdm_mask|>", unk_token="<|pad|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_base_model(folder: str | Path, seed: int = 0, d_model: int = 128, n_layers: int = 4,
                    max_sequence_length: int = 64) -> Path:
    """Write a randomly initialised LLaDA-architecture checkpoint + tokenizer to ``folder``
    (context of ``max_sequence_length`` tokens)."""
    import tempfile

    import dare
    from dare_plugins.llada.modeling import build, tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp))
        vocab = len(tok)
        config = tiny_config(vocab_size=vocab, embedding_size=vocab, d_model=d_model, n_layers=n_layers,
                             n_heads=4, n_kv_heads=4, mlp_hidden_size=4 * d_model,
                             max_sequence_length=max_sequence_length,
                             mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, rope_theta=10000.0)
        torch.manual_seed(seed)
        model = build(config)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, std=0.02 if "wte" in name else p.shape[-1] ** -0.5)
        model.hf_config, model.family = config, "llada"
        return dare.save_model(model, folder, tokenizer_from=tmp)
