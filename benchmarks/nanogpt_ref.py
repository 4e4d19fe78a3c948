"""nanoGPT's training step on the baby shape, in PyTorch: the reference the brief measures us by.

    python benchmarks/nanogpt_ref.py [--steps 100]     (needs torch; prints one JSON line)

The model is nanoGPT's model.py (github.com/karpathy/nanoGPT, MIT) restated compactly with the
settings of its README's CPU "baby GPT" run (`--block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --dropout=0.0`, train.py's bias=False, AdamW betas (0.9, 0.99),
weight decay 0.1 on matrices, grad clip 1.0): learned positions, LayerNorm, exact GELU, dropout modules at p=0,
`scaled_dot_product_attention`, tied head. One step = forward, loss, backward, clip, AdamW
step, zero_grad: train.py's loop body with gradient_accumulation_steps=1. Timed eager and under
`torch.compile` (the fastest of 3 interleaved rounds' median wall time, after warm-up), on random
token batches of the char vocabulary. `nox -s benchmarks` runs it in its own virtual environment
(torch never meets our JAX).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's convention)
from torch import nn

VOCAB, CTX, BATCH, LAYERS, HEADS, DIM = 65, 64, 12, 4, 4, 128


class LayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(DIM), LayerNorm(DIM)
        self.c_attn, self.attn_proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(DIM, 4 * DIM, bias=False), nn.Linear(4 * DIM, DIM, bias=False)
        self.resid_drop_1, self.resid_drop_2 = nn.Dropout(0.0), nn.Dropout(0.0)  # as nanoGPT (p=0.0)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.resid_drop_1(self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        return x + self.resid_drop_2(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(CTX, DIM)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def make_step(compiled: bool):
    """nanoGPT's train.py loop body for a fresh model (eager, or under torch.compile)."""
    torch.manual_seed(1337)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    forward = torch.compile(model) if compiled else model

    def step():
        x = torch.randint(VOCAB, (BATCH, CTX + 1))
        loss = forward(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_round(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds}
    steps = {}
    for mode in ("eager", "compiled"):
        try:
            t0 = time.perf_counter()
            steps[mode] = make_step(mode == "compiled")
            steps[mode]()  # the first step compiles under torch.compile
            out[mode] = {"first_step_s": round(time.perf_counter() - t0, 2)}
            for _ in range(10):
                steps[mode]()
        except Exception as e:  # noqa: BLE001 (torch.compile needs a C++ toolchain: report, go on)
            out[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
            steps.pop(mode, None)
    medians = {mode: [] for mode in steps}
    for _ in range(args.rounds):  # interleaved, the fastest round's median kept (as run.py does)
        for mode, step in steps.items():
            medians[mode].append(time_round(step, args.steps))
    for mode, ms in medians.items():
        out[mode].update(ms_per_step=round(1e3 * min(ms), 2), ms_per_step_rounds=[round(1e3 * m, 2) for m in ms])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
