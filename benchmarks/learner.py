"""Learner throughput: tokens/s and achieved FLOP/s of SFT and DPO steps, full and LoRA.

    python benchmarks/learner.py [--json benchmarks/results/learner.json] [--steps 5]

A LLaDA-architecture model (~25M parameters: d_model 512, 6 layers, MLP 1536, vocab 8192)
is built in code and trained with the registered ``sft`` and ``dpo`` algorithms through the
same learner step code the workers use. The machine's matmul peak is measured first
(float32 ``torch.mm`` of 2048^3, all threads), and each configuration's achieved FLOP/s is
reported as a fraction of it, all side by side in one run.

FLOPs counted per step (model FLOPs, as MFU does; recomputation not counted):
  matmul weights N (all linear layers incl. LM head, not the embedding lookup), T tokens
  full fine-tuning:  6 N T  (+ attention 12 * layers * L^2 * d per sequence)
  LoRA:              4 N T  (no weight gradients for frozen layers) + 6 N_lora T
  DPO:               per MC sample, policy fwd+bwd as above on both rows + reference fwd 2 N T
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dare.executor.roles import Learner, ReferencePolicy
from dare.lora import apply_lora
from dare.plugins import registry
from dare.protocol import TokenBatch
from dare_plugins.llada.modeling import build, tiny_config

from _common import matmul_peak  # benchmarks/ is on sys.path when run as a script

SIZES = dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, vocab_size=8192,
             max_sequence_length=1024)


def make_model(lora: bool):
    torch.manual_seed(0)
    config = tiny_config(**SIZES)
    model = build(config)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02 if "norm" not in name else 0.0)
        if "norm" in name:
            torch.nn.init.ones_(p)
    model.hf_config, model.family = config, "llada"
    if lora:
        model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules=list(
            registry().families.get("llada").lora_target_modules))
    return model, config


def batch(rows: int, length: int, prompt: int, config: dict) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"] - 2, (rows, length), generator=g)
    prompt_lengths = torch.full((rows,), prompt)
    loss_mask = torch.arange(length)[None].expand(rows, length) >= prompt
    return TokenBatch(ids, prompt_lengths, torch.ones_like(ids), loss_mask, torch.arange(rows))


def step_flops(model, config, rows, length, lora: bool, algo: str, n_mc: int) -> float:
    d, layers = config["d_model"], config["n_layers"]
    base = model.get_base_model() if lora else model
    n_matmul = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) if lora else 0
    tokens = rows * length
    attn = 2 * 2 * layers * length * length * d * rows  # forward QK^T and AV
    fwd = 2 * n_matmul * tokens + attn
    train = (2 * fwd if lora else 3 * fwd) + 6 * n_lora * tokens
    if algo == "sft":
        return train
    return n_mc * (train + fwd)  # dpo: policy fwd+bwd and reference fwd per MC sample


class BenchLearner(Learner):
    """The worker's Learner, built around an in-code model instead of a checkpoint."""

    def __init__(self, model, algo: str, options: dict, units: int):
        self.recipe = None
        reg = registry()
        self.family = reg.families.get("llada")
        self.algorithm = reg.algorithms.get(algo)
        self.algo_config = self.algorithm.config_type(**options)
        self.model = model.train()
        self.rank, self.world_size, self.version, self._frozen = 0, 1, 0, None
        if self.algorithm.needs_reference and not hasattr(model, "peft_config"):
            self._frozen = make_model(lora=False)[0].requires_grad_(False).eval()
        self._units = units
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run_step(self, shard: TokenBatch) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        reference = ReferencePolicy(self) if self.algorithm.needs_reference else None
        per_unit, _ = self.algorithm.loss(self.model, shard, self.algo_config, self.family, reference=reference)
        (per_unit.sum() / self._units).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/learner.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    reg = registry()
    configs = [("sft", False), ("sft", True)]
    if "dpo" in reg.algorithms:
        configs += [("dpo", False), ("dpo", True)]
    results = []
    for algo, lora in configs:
        model, config = make_model(lora)
        n_mc = 1
        options = {}
        if algo == "dpo":
            fields = {f for f in reg.algorithms.get("dpo").config_type.__dataclass_fields__}
            options = {"n_mc": 1} if "n_mc" in fields else {}
            n_mc = options.get("n_mc", 1)
        units = args.rows // reg.algorithms.get(algo).rows_per_unit
        learner = BenchLearner(model, algo, options, units)
        shard = batch(args.rows, args.length, args.length // 4, config)
        learner.run_step(shard)  # warm-up
        times = [learner.run_step(shard) for _ in range(args.steps)]
        t = statistics.median(times)
        flops = step_flops(model, config, args.rows, args.length, lora, algo, n_mc)
        results.append({
            "algorithm": algo, "lora": lora, "rows": args.rows, "length": args.length,
            "step_s": t, "tokens_per_s": args.rows * args.length / t, "flops_per_step": flops,
            "achieved_flops": flops / t, "fraction_of_peak": flops / t / peak,
        })
    params = sum(p.numel() for p in make_model(False)[0].parameters())
    print(f"model: LLaDA architecture, {params / 1e6:.1f}M parameters {SIZES}")
    print(f"matmul peak (fp32 mm 2048^3, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'algorithm':<10}{'lora':<6}{'step s':>9}{'tokens/s':>11}{'GFLOP/s':>10}{'of peak':>9}")
    for r in results:
        print(f"{r['algorithm']:<10}{str(r['lora']):<6}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{r['achieved_flops'] / 1e9:>10.1f}{r['fraction_of_peak']:>9.1%}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"peak_flops": peak, "threads": args.threads, "params": params,
                               "sizes": SIZES, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
