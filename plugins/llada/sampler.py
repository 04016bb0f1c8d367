"""LLaDA's reference sampler (ML-GSAI/LLaDA ``generate.py``: ``generate``).

The prompt is followed by ``gen_length`` mask tokens, split into ``gen_length / block_length``
blocks filled left to right (semi-autoregressive). Each block gets ``steps / num_blocks`` steps;
at every step the model predicts all positions, and the ``k`` still-masked positions of the
current block with the highest confidence are committed, where ``k`` follows the linear
schedule of ``get_num_transfer_tokens`` (the block's masks spread evenly over its steps, the
remainder going to the first steps). Confidence is the softmax probability of the predicted
token (``low_confidence``) or a uniform draw (``random``). Predictions use Gumbel-max sampling
in float64 (``exp(logits) / (-log u) ** temperature``), plain argmax at temperature 0.
``cfg_scale > 0`` runs a second, unconditional copy with the prompt masked (in the same
forward call) and uses ``un + (cfg_scale + 1) * (cond - un)``.

One deliberate difference: the ``low_confidence`` softmax runs in float32 at least (the
reference runs it in the logits' dtype, i.e. bf16 for a bf16 model, where many confidences tie);
for float32 / float64 models the results are the reference's.

Randomness: with ``generator=None`` the draws (Gumbel uniforms over the full (B, L, V)
logits when temperature > 0, then the (B, L) uniforms of ``random`` remasking) come from the
global torch RNG in the reference's order, so ``torch.manual_seed`` reproduces a reference run.
A ``torch.Generator`` (on the model's device) makes the same draws from it instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput

REMASKING = ("low_confidence", "random")
LLADA_EOT_ID = 126348  # <|eot_id|> of LLaDA-8B-Instruct's tokenizer; config.json does not name it


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) int64: how many masked positions to commit at each step of a block.

    Every row spreads its ``mask_index.sum()`` masks evenly; the first ``remainder`` steps
    take one more.
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]
    return base + (step < remainder).long()


def add_gumbel_noise(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max scores: argmax(exp(l) / (-log u) ** T) samples softmax(l / T).

    In float64, as the reference (low-precision Gumbel noise hurts generation quality,
    arXiv:2409.02908). Temperature 0 returns ``logits`` itself (no draw).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def initial_canvas(prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, gen_length: int, mask_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt followed by ``gen_length`` masks (B, P + G), and the attention mask extended
    over the generated positions (None stays None)."""
    batch, prompt_len = prompt_ids.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids.to(device)
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected the prompt's {tuple(prompt_ids.shape)}")
        attention_mask = attention_mask.to(device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=-1)
    return x, attention_mask


def _config(model) -> dict:
    for obj in (model, getattr(getattr(model, "base_model", None), "model", None)):
        if isinstance(getattr(obj, "hf_config", None), dict):
            return obj.hf_config
    raise ValueError("model has no hf_config; load it with dare.load_model")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, generator: torch.Generator | None = None,
             eos_id: int | None = None, eot_id: int | None = None) -> GenerationOutput:
    """Generate ``gen_length`` tokens after ``prompt_ids`` (B, P), as the reference ``generate``.

    attention_mask: (B, P), 1 on real prompt tokens and 0 on left padding; the generated
        positions are always attended. Rotary positions stay 0..L-1 in every row, as the
        reference.
    steps: total denoising steps, divided evenly among the ``gen_length / block_length`` blocks.
    temperature: Gumbel-max sampling temperature (0: greedy).
    cfg_scale: classifier-free guidance scale (0: off).
    remasking: ``low_confidence`` or ``random``.
    mask_id: defaults to the model config's ``mask_token_id``.
    logits_eos_inf: forbid predicting EOS (its logit is set to -inf; LLaDA paper App. B.4).
    confidence_eos_eot_inf: give predicted EOS / EoT tokens zero confidence so they are
        committed last (App. B.4), after the prediction is made. Exactly as the reference, which
        writes -inf into the EOS column of the Gumbel scores and the EoT column of the logits:
        at temperature 0 those are one tensor, so both EOS and EoT get confidence 0; at
        temperature > 0 only EoT does (the EOS write then has no effect).
    generator: optional torch.Generator for the random draws (see the module docstring).
    eos_id / eot_id: default to the config's ``eos_token_id`` and ``eot_token_id`` (else
        LLaDA's ``<|eot_id|>`` 126348); the reference hard-codes 126081 / 126348.

    Returns ``GenerationOutput(sequences (B, P + gen_length), unmask_step (B, gen_length),
    nfe)``: the global 0-based step at which each generated position was committed, and the
    number of model calls (one per step; a CFG step is one call on a doubled batch).
    """
    config = _config(model)
    mask_id = int(config["mask_token_id"] if mask_id is None else mask_id)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    batch, prompt_len = prompt_ids.shape
    _validate(config, prompt_len, steps, gen_length, block_length, remasking)
    device = _device(model)

    x, attention_mask = initial_canvas(prompt_ids, attention_mask, gen_length, mask_id, device)
    prompt_index = x != mask_id
    vocab = config.get("embedding_size") or config["vocab_size"]
    eos = int(config["eos_token_id"] if eos_id is None else eos_id)
    eot = int(config.get("eot_token_id", LLADA_EOT_ID) if eot_id is None else eot_id)
    for name, tid, used in (("eos_id", eos, logits_eos_inf or confidence_eos_eot_inf),
                            ("eot_id", eot, confidence_eos_eot_inf)):
        if used and not 0 <= tid < vocab:
            raise ValueError(f"{name}={tid} is outside the model's vocabulary of {vocab}")

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    unmask_step = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    nfe = 0
    for block in range(num_blocks):
        block_end = prompt_len + (block + 1) * block_length
        block_masks = x[:, block_end - block_length:block_end] == mask_id
        num_transfer = get_num_transfer_tokens(block_masks, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                logits, un_logits = model(torch.cat([x, un_x]), attention_mask=am).logits.chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            nfe += 1

            if logits_eos_inf:
                logits[:, :, eos] = -torch.inf
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)

            if confidence_eos_eot_inf:  # the reference's `noisy[..., eos] = logits[..., eot] = -inf`
                logits = logits.clone()
                logits[:, :, [eos, eot] if temperature == 0 else [eot]] = -torch.inf
            if remasking == "low_confidence":
                lp = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
                x0_p = F.softmax(lp, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=x0.device, generator=generator)
            x0_p[:, block_end:] = -torch.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(batch):
                _, chosen = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, chosen] = True
            x[transfer] = x0[transfer]
            unmask_step[transfer[:, prompt_len:]] = block * steps_per_block + i
    return GenerationOutput(sequences=x, unmask_step=unmask_step, nfe=nfe)


def _validate(config: dict, prompt_len: int, steps: int, gen_length: int, block_length: int,
              remasking: str) -> None:
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(f"gen_length ({gen_length}), block_length ({block_length}) and steps ({steps}) "
                         "must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks})")
    max_len = config.get("max_sequence_length")
    if max_len is not None and prompt_len + gen_length > max_len:
        raise ValueError(f"prompt length ({prompt_len}) + gen_length ({gen_length}) exceeds the model's "
                         f"max_sequence_length ({max_len})")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}; expected one of {', '.join(REMASKING)}")
