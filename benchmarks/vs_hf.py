"""Time one training step of models.gpt.GPT against transformers' GPT2LMHeadModel.

Both models get the same GPT-2 architecture (gelu_tanh, LayerNorm with bias,
learned positions, tied embeddings), the same batch, fp32, the default CPU
thread count, the same loss (mean fp32 cross-entropy over all B*T positions,
computed outside the HF model so its label shift does not change the work) and
AdamW with the same settings. Steps of the two models alternate, and the order
flips every step, so that thermal or frequency drift hits both equally; the
figure reported is the median step time.

    python benchmarks/vs_hf.py --out results/vs_hf.json

ratio = ours / hf; <= 1.0 means our model is no slower than the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import transformers  # noqa: E402

from harness.models.gpt import GPT, GPTConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="kept modest so the lm_head does not drown out the transformer blocks")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/vs_hf.json"))
    return p.parse_args(argv)


def build_ours(args: argparse.Namespace) -> GPT:
    cfg = GPTConfig(
        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads, seq_len=args.seq_len,
        vocab_size=args.vocab_size, activation="gelu_tanh", norm="layernorm", position="learned",
        tie_embeddings=True, bias=True,
    )
    return GPT(cfg)


def build_hf(args: argparse.Namespace) -> nn.Module:
    # GPT2LMHeadModel.__init__ takes no attn_implementation argument; the config carries it.
    cfg = transformers.GPT2Config(
        n_layer=args.n_layers, n_embd=args.d_model, n_head=args.n_heads, n_positions=args.seq_len,
        vocab_size=args.vocab_size, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True, use_cache=False, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(cfg)


def make_step(
    model: nn.Module, logits_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
    targets: torch.Tensor,
) -> Callable[[], float]:
    """A closure running forward + backward + AdamW step and returning its wall time in seconds."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    def step() -> float:
        start = time.perf_counter()
        logits = logits_fn(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ours, hf = build_ours(args), build_hf(args)
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len))
    targets = torch.roll(tokens, shifts=-1, dims=1)

    steps = {
        "ours": make_step(ours, ours, tokens, targets),
        "hf": make_step(hf, lambda t: hf(input_ids=t).logits, tokens, targets),
    }
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(args.warmup + args.steps):
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for name in order:
            elapsed = steps[name]()
            if i >= args.warmup:
                times[name].append(elapsed)

    median = {name: statistics.median(t) for name, t in times.items()}
    tokens_per_step = args.batch * args.seq_len
    result = {
        "benchmark": "models.gpt.GPT vs transformers.GPT2LMHeadModel, fwd+bwd+AdamW step, fp32, CPU",
        "median_step_s": median,
        "ratio_ours_over_hf": median["ours"] / median["hf"],
        "tokens_per_s": {name: tokens_per_step / m for name, m in median.items()},
        "step_times_s": times,
        "dims": {
            "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "seq_len": args.seq_len, "vocab_size": args.vocab_size, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup,
        },
        "params": {"ours": ours.num_params(), "hf": count_params(hf)},
        "hf_attn_implementation": hf.config._attn_implementation,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "host": {
            "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "machine": platform.machine(), "platform": platform.platform(),
        },
        "command": shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"vs_hf: ours {median['ours'] * 1e3:.1f} ms/step, hf({result['hf_attn_implementation']}) "
        f"{median['hf'] * 1e3:.1f} ms/step, ratio {result['ratio_ours_over_hf']:.3f} "
        f"(median of {args.steps}, {os.cpu_count()} CPUs, torch {torch.__version__}) -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
