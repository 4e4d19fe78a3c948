"""SmolLM2-135M side by side with transformers (+ peft), interleaved in one process.

    PYTHONPATH=src python benchmarks/smollm2.py MODEL [--repeats 3] [--decode_tokens 32]
    PYTHONPATH=src python benchmarks/smollm2.py --random_init --torch_device cuda   # a GPU machine

MODEL: a GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) or a Hugging Face folder. transformers
loads it (`from_pretrained(dir, gguf_file=name)` dequantises a GGUF to float32); ours is that
same model written with `save_pretrained` to a temporary folder and read by `run.hf.from_hf`,
so both sides hold the same float32 weights. Measured, float32, after warm-up (compilation
excluded), each repeat timing every entry once in turn (a slow spell of a shared machine hits
all of them; every other repeat in reverse order, so that neither side always runs right after
the other), median over repeats and the median of each repeat's ours / theirs ratio:
- LoRA r8 on every projection (ours: lora_targets "all"; peft: q, k, v, o, gate, up, down),
  alpha 16, and the full fine-tune, AdamW, batch 2 x 256: ms per optimizer step. PyTorch's
  full step twice: with `torch.optim.AdamW()` as constructed without options (a per-tensor loop
  on CPU; the issue's baseline) and with `fused=True`, the one-pass kernel transformers'
  `Trainer` uses by default with torch >= 2.8 (`full_torch_fused_adamw`);
- every round runs each training entry `--steps_per_visit` times back to back (default 3) and
  takes their median: the steady state of a training run. Each step's time and the process's
  minor page faults are recorded, and the ratio of the visits' first steps too: a step whose
  temporaries land in fresh pages pays for it (our LoRA step's 1.2 GB: ~300k faults, +150-550
  ms), as most of them did here before `hostmem.keep_freed_memory` stopped glibc from trimming
  the heap that the entries share;
- greedy decoding of `--decode_tokens` tokens after a short prompt: tokens/s of ours with
  weights stored float32 / bfloat16 / int8 (infer/storage.py) and of transformers' `generate`
  (float32, its KV cache), and whether each greedy continuation equals our float32 one.
`--random_init` builds SmolLM2-135M's architecture with random weights instead (the times depend
on the shapes only; no tokenizer, so the prompt is fixed random ids): for a machine with no copy
of the model, such as a lent GPU (`--torch_device cuda`; ours runs on JAX's default device, and
both sides' float32 matmuls are then full float32, not TF32). Writes
benchmarks/results/smollm2_cpu.json (`--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from dantinox_eqx.files import atomic_write_text
from dantinox_eqx.hostmem import keep_freed_memory, restart_with_huge_pages
from dantinox_eqx.infer.generate import generate_ids
from dantinox_eqx.infer.storage import store_weights
from dantinox_eqx.lora import apply_lora, lora_trainable
from dantinox_eqx.run.hf import from_hf
from dantinox_eqx.train.layer_layout import unstack_model
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The three most important things to remember when learning to cook are"
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# SmolLM2-135M's shapes (its config.json), for `--random_init`: the times depend on them only
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")


def load_both(path: Path | None, max_context: int):
    """(transformers model, its tokenizer, our model, our tokenizer) of the same float32 weights;
    path None: SmolLM2-135M's architecture with random weights (torch seed 0) and no tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if path is None:
        torch.manual_seed(0)
        tf, tf_tok = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).float(), None
    else:
        kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        folder = path.parent if path.suffix == ".gguf" else path
        tf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
        tf_tok = AutoTokenizer.from_pretrained(folder, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        # save_pretrained refuses a model loaded from a GGUF ("not serializable"): the dequantised
        # float32 weights and the config are written directly (a tied head only once)
        from safetensors.torch import save_file

        tf.config.save_pretrained(tmp)
        sd = {k: v.contiguous() for k, v in tf.state_dict().items()}
        if tf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        if tf_tok is not None:
            tf_tok.save_pretrained(tmp)
        else:  # from_hf wants a tokenizer: one word per id, never used for the timings
            from tokenizers import Tokenizer, models

            vocab = {f"t{i}": i for i in range(tf.config.vocab_size)}
            Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(f"{tmp}/tokenizer.json")
        ours, cfg, tok = from_hf(tmp, max_context=max_context)
    return tf, tf_tok, ours, tok


def ours_step(model, lora: bool, batch: np.ndarray, scan: bool = False):
    """A zero-argument callable running one jitted AdamW step (LoRA or full) of our model, with
    its layers as separate arrays, as the trainer runs a model this deep
    (train/layer_layout.py; `--scan` for the scanned, stacked layers)."""
    trainable = None
    if lora:
        model = apply_lora(model, "all", 8, 16.0, key=jax.random.key(1))
        trainable = lora_trainable(model)
    if not scan:
        model, trainable = unstack_model(model, trainable)
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(jnp.copy, params)  # the step donates its buffers: keep `model`'s for decoding
    opt = optax.adamw(1e-4)
    state = {"p": params, "s": init_opt_state(opt, params, trainable)}
    step = make_train_step(static, opt, trainable=trainable)
    batch = jnp.asarray(batch[None])

    def run():
        state["p"], state["s"], m = step(state["p"], state["s"], batch, jax.random.key(0))
        return float(m["loss"])

    return run


def torch_step(tf, lora: bool, batch: np.ndarray, fused: bool = False, device: str = "cpu"):
    """The same step in PyTorch on `device`: AdamW on all parameters, or peft LoRA on every
    projection. `torch.optim.AdamW()` runs its per-tensor loop on CPU; `fused` is the one-pass
    kernel that transformers' `Trainer` picks by default with torch >= 2.8
    (`optim="adamw_torch_fused"`)."""
    import copy

    model = copy.deepcopy(tf).to(device)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=LORA_MODULES))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused or None)
    ids = torch.from_numpy(batch.astype(np.int64)).to(device)

    def run():
        loss = _torch_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)  # waits for the device (a GPU's queue too)

    return run


def _torch_loss(model, ids):
    """Mean next-token cross-entropy in float32, as ours (`train.step.loss_fn`)."""
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def median_round_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of each round's time ratio. A round's entries run back to back, so
    this is steadier than the ratio of medians when the machine's speed drifts between rounds."""
    return round(statistics.median([a / b for a, b in zip(ours, theirs)]), 3)


def decode_ours(model, weights: str, prompt_ids: list[int], n: int):
    stored = store_weights(model, weights)

    def run():
        ids, _ = generate_ids(stored, [prompt_ids], n, temperature=0.0)
        return ids[0].tolist()

    return run


def decode_torch(tf, prompt_ids: list[int], n: int, device: str = "cpu"):
    tf = tf.to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)

    def run():
        with torch.no_grad():
            out = tf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?", help="the GGUF file or HF folder (not with --random_init)")
    ap.add_argument("--random_init", action="store_true",
                    help="SmolLM2-135M's architecture with random weights, no file (a GPU machine with no "
                         "copy of the model); the prompt is then fixed token ids")
    ap.add_argument("--torch_device", default="cpu", help="cpu or cuda (ours runs on JAX's default device)")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row of the training batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps_per_visit", type=int, default=3,
                    help="training steps run back to back each time a round reaches a training entry; "
                         "the round's time is their median (a training run's steady state: its first "
                         "step after the other programs may find its temporaries' memory handed out)")
    ap.add_argument("--decode_tokens", type=int, default=32)
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--default_malloc", action="store_true",
                    help="leave glibc's malloc settings as they are (both sides) instead of the CLI's: "
                         "no huge pages, no kept heap (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns off "
                         "the huge pages alone)")
    ap.add_argument("--scan", action="store_true",
                    help="our steps with the scanned, stacked layers (before issue 25's per-layer arrays)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "smollm2_cpu.json")
    a = ap.parse_args()
    if (a.model is None) != a.random_init:
        ap.error("give MODEL or --random_init, one of them")
    dev = a.torch_device
    if dev != "cpu":
        # float32 means float32 on both sides: PyTorch's CUDA matmuls are full float32 by default,
        # XLA's GPU dots would take TF32 at the default precision
        jax.config.update("jax_default_matmul_precision", "highest")
    if not a.default_malloc:
        # as the CLI does first thing (hostmem.py), process-wide, so PyTorch's side gets both too:
        # glibc's huge pages (start again under the tunable) and the kept heap
        restart_with_huge_pages([sys.executable, *sys.argv])
        keep_freed_memory()
    torch.set_num_threads(os.cpu_count())
    tf, tf_tok, ours, tok = load_both(None if a.random_init else a.model, max_context=max(512, a.seq))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, ours.vocab_size, (a.batch_size, a.seq + 1)).astype(np.int32)
    if a.random_init:
        prompt_ids = [int(i) for i in rng.integers(0, ours.vocab_size, 14)]
    else:
        prompt_ids = tok.encode(PROMPT).ids
        assert prompt_ids == tf_tok(PROMPT)["input_ids"], "tokenizers disagree"
    n = a.decode_tokens
    entries = {}
    if not a.skip_train:
        entries |= {"lora_r8_ours": ours_step(ours, True, batch, a.scan),
                    "lora_r8_torch_peft": torch_step(tf, True, batch, device=dev),
                    "full_ours": ours_step(ours, False, batch, a.scan),
                    "full_torch": torch_step(tf, False, batch, device=dev),
                    "full_torch_fused_adamw": torch_step(tf, False, batch, fused=True, device=dev)}
    # Our decoders store their weights when built, so they are built in the warm-up loop: a
    # backend that cannot store or run the bfloat16 / int8 option loses that row only.
    builders = {f"decode_{w}_ours": functools.partial(decode_ours, ours, w, prompt_ids, n)
                for w in ("float32", "bfloat16", "int8")}
    optional = {"decode_bfloat16_ours", "decode_int8_ours"}
    entries |= dict.fromkeys(builders)
    entries["decode_float32_torch"] = decode_torch(tf, prompt_ids, n, device=dev)
    outputs, failed = {}, {}
    for name in list(entries):
        try:
            if name in builders:
                entries[name] = builders[name]()
            for _ in range(a.warmup):
                outputs[name] = entries[name]()
        except Exception as e:  # noqa: BLE001 (recorded in the results)
            if name not in optional:
                raise
            failed[name] = f"{type(e).__name__}: {e}"[:500]
            del entries[name]
    visits = {k: [] for k in entries}  # per round, the times of the visit's steps (one for decoding)
    faults = {k: [] for k in entries}  # and their minor page faults
    for r in range(a.repeats):
        # Odd rounds run the entries in reverse: each one follows a different program in turn, so
        # neither side always runs right after the other's (caches, allocator, worker threads).
        for name, fn in (entries.items() if r % 2 == 0 else reversed(entries.items())):
            steps = 1 if name.startswith("decode") else a.steps_per_visit
            ts, fs = [], []
            for _ in range(steps):
                f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                outputs[name] = fn()
                ts.append(time.perf_counter() - t)
                # the whole process's page faults during the step (module docstring)
                fs.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            visits[name].append(ts)
            faults[name].append(fs)
    times = {k: [statistics.median(ts) for ts in v] for k, v in visits.items()}  # a round's time
    res = {"what": f"SmolLM2-135M float32 on {jax.devices()[0].platform.upper()}; median over interleaved "
                   "repeats, order reversed every other round (compilation excluded)",
           "model": "random_init (SmolLM2-135M's shapes)" if a.random_init else a.model.name,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "jax_device": jax.devices()[0].device_kind, "torch_device": dev + (
               f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else ""),
           "jax": jax.__version__, "torch": torch.__version__, "repeats": a.repeats,
           "batch": f"{a.batch_size} x {a.seq}",
           "decode_tokens": n, "prompt": "random ids" if a.random_init else PROMPT,
           "our_layers": "scan" if a.scan else "per_layer",
           "steps_per_visit": a.steps_per_visit, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
           "malloc": "glibc defaults" if a.default_malloc else "hostmem.keep_freed_memory",
           "failed_entries": failed}
    for name, ts in times.items():
        med = statistics.median(ts)
        if name.startswith("decode"):
            res[name] = {"tokens_per_s": round(n / med, 2), "s": [round(t, 3) for t in ts],
                         "text_equals_ours_float32": outputs[name] == outputs["decode_float32_ours"]}
        else:
            res[name] = {"ms_per_step": round(1e3 * med, 1), "ms": [round(1e3 * t, 1) for t in ts],
                         "ms_first_step_of_visit": [round(1e3 * v[0], 1) for v in visits[name]],
                         "ms_each_step": [[round(1e3 * t, 1) for t in v] for v in visits[name]],
                         "minor_page_faults": faults[name]}
    if "full_ours" in res:  # against transformers' Trainer default optimizer (torch_step's docstring)
        res["full_ratio_median_of_rounds_vs_fused_adamw"] = median_round_ratio(times["full_ours"],
                                                                               times["full_torch_fused_adamw"])
    for kind in ("lora_r8", "full"):
        if f"{kind}_ours" in res:
            other = "torch_peft" if kind == "lora_r8" else "torch"
            res[f"{kind}_ratio_ours_over_torch"] = round(res[f"{kind}_ours"]["ms_per_step"]
                                                         / res[f"{kind}_{other}"]["ms_per_step"], 3)
            res[f"{kind}_ratio_median_of_rounds"] = median_round_ratio(times[f"{kind}_ours"],
                                                                       times[f"{kind}_{other}"])
            res[f"{kind}_ratio_median_of_rounds_first_step"] = median_round_ratio(
                [v[0] for v in visits[f"{kind}_ours"]], [v[0] for v in visits[f"{kind}_{other}"]])
    for w in ("float32", "bfloat16", "int8"):
        if f"decode_{w}_ours" not in res:
            continue
        res[f"decode_{w}_speedup_vs_torch"] = round(res[f"decode_{w}_ours"]["tokens_per_s"]
                                                    / res["decode_float32_torch"]["tokens_per_s"], 3)
    if not a.random_init:
        res["greedy_text_ours_float32"] = tok.decode(outputs["decode_float32_ours"])
    atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)} |
                     {k: v.get("ms_per_step", v.get("tokens_per_s")) for k, v in res.items() if isinstance(v, dict)},
                     indent=1))


if __name__ == "__main__":
    main()
