"""Synthetic everyday text: stories, diary entries, dialogues and letters written by the instruct
model itself from a seeded grid of prompts (issue 16 "Text").

No sizeable corpus of everyday, personal or emotional English installs offline, and the paper's
simple-story set (TinyStories, §5.1) is itself model-generated. This module writes the honest
equivalent: the default model's own instruct variant answers prompts that combine a form
("a diary entry", "a conversation between two friends", ...), a topic (weddings, anger, food,
sport, money, ...) and a mood. The domain is labelled **synthetic** everywhere it is used.

    python -m steering.training.everyday --tokens 200000     # resumable; appends to the cache

Output: ``$FFP_CACHE/corpora/everyday.jsonl``, one ``{"i", "prompt", "text"}`` per line. Prompt
``i`` depends only on the seed and ``i``, so reruns continue where the last one stopped.

Generating is slow on 2 CPU cores, so a snapshot of the generated texts is committed in
``assets/corpora/everyday.jsonl.gz`` (seed 0; its recipe is in docs/saes.md): where the cache has
no file, the texts are read from it, and a longer run starts from it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMS = (
    "a short story for young children", "a diary entry", "a conversation between two friends",
    "a letter to a family member", "a forum post asking for advice", "a text message exchange",
    "a short story", "a personal blog post", "a phone call between a mother and her son",
    "a school essay", "a speech at a family gathering", "a reply to a friend who is upset",
)
TOPICS = (
    "a wedding", "getting married", "being angry at a friend", "a frustrating day at work",
    "feeling sad after losing a pet", "grief after a funeral", "feeling anxious and stressed",
    "depression and asking for help", "cooking dinner for the family", "a favourite recipe",
    "eating at a restaurant", "a football match", "training for a marathon", "a basketball game",
    "learning to play the guitar", "going to a concert", "singing in a choir", "a new puppy",
    "a cat that gets lost", "animals on a farm", "going to church", "praying to God",
    "a religious holiday", "learning to write Python code", "fixing a bug in a computer program",
    "a science experiment at school", "the stars and planets", "a visit to the doctor",
    "staying healthy and exercising", "saving money for a house", "losing a job and paying bills",
    "a birthday party", "moving to a new city", "a rainy day", "a holiday at the beach",
    "a fight between siblings", "a first day at school", "a garden in spring", "a long train trip",
    "a grandmother's stories", "a broken promise", "winning a prize",
)
MOODS = ("happy", "angry", "sad", "worried", "excited", "calm", "lonely", "proud", "scared", "grateful")


def prompt_for(i: int, seed: int = 0) -> str:
    """The i-th prompt of the seeded grid (independent of how many were made before)."""
    rng = random.Random(f"{seed}:{i}")
    return (f"Write {rng.choice(FORMS)} about {rng.choice(TOPICS)}. The tone is {rng.choice(MOODS)}. "
            "Use simple everyday English.")


SNAPSHOT = Path(__file__).resolve().parents[2] / "assets" / "corpora" / "everyday.jsonl.gz"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def output_path() -> Path:
    from ..bundle import cache_dir

    return cache_dir() / "corpora" / "everyday.jsonl"


def read_rows(path: Path) -> list[dict]:
    """The ``{"i", "prompt", "text", ...}`` rows of a generated file (``.gz`` or plain), by ``i``."""
    raw = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return sorted((json.loads(line) for line in raw.splitlines() if line.strip()), key=lambda r: r["i"])


def load_docs(path: Path | None = None, snapshot: Path | None = SNAPSHOT) -> list[str]:
    """The generated texts, in prompt order: the cache file, else the committed ``snapshot``;
    raises FileNotFoundError if neither exists."""
    path = path or output_path()
    if not path.is_file():
        if snapshot is None or not snapshot.is_file():
            raise FileNotFoundError(f"{path} missing; run python -m steering.training.everyday")
        path = snapshot
    return [r["text"] for r in read_rows(path) if len(r["text"]) > 80]


@torch.no_grad()
def generate(tokens: int, batch: int = 32, max_new_tokens: int = 220, seed: int = 0,
             path: Path | None = None, preset: str = "default", device: str | None = None,
             dtype: str = "float32", snapshot: Path | None = SNAPSHOT) -> Path:
    """Append texts until the file holds about ``tokens`` generated tokens. Sampling: T = 0.9,
    top-p 0.95, seeded per batch (the batch size and ``dtype`` are part of the recipe). Resumable:
    prompts already in the file are skipped; a missing file starts as a copy of the committed
    ``snapshot`` when that was made with the same seed (its first prompt matches)."""
    from ..bundle import load_model, pick_device
    from ..presets import get_preset

    path = path or output_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() and snapshot is not None and snapshot.is_file():
        rows = read_rows(snapshot)
        if rows and rows[0]["prompt"] == prompt_for(rows[0]["i"], seed):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            log.info("everyday text: started from the snapshot %s (%d texts)", snapshot, len(rows))
    done, have = 0, 0
    if path.is_file():
        rows = read_rows(path)
        done = 1 + max((r["i"] for r in rows), default=-1)
        have = sum(r.get("n_tokens", 0) for r in rows)
    if have >= tokens:
        return path
    dev = pick_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    model, tok = load_model(get_preset(preset), dev, DTYPES[dtype])
    tok.padding_side = "left"
    bar = tqdm(total=tokens, initial=have, desc="everyday text", unit="tok")
    with path.open("a") as f:
        while have < tokens:
            prompts = [prompt_for(done + j, seed) for j in range(batch)]
            chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            torch.manual_seed(seed * 1_000_003 + done)
            out = model.generate(**enc, do_sample=True, temperature=0.9, top_p=0.95,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for j, row in enumerate(new):
                ids = [t for t in row.tolist() if t != tok.pad_token_id]
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id)]
                text = tok.decode(ids, skip_special_tokens=True).strip()
                f.write(json.dumps({"i": done + j, "prompt": prompts[j], "text": text,
                                    "n_tokens": len(ids)}) + "\n")
                have += len(ids)
                bar.update(len(ids))
            f.flush()
            done += batch
    bar.close()
    log.info("everyday text: %d tokens in %s", have, path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic everyday-text domain")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="model dtype (texts differ between dtypes; bfloat16 was not faster than float32 for "
                        "generation at batch 96 on this project's 2-core CPU: ~145 vs ~157 tokens/s)")
    p.add_argument("--snapshot", type=Path, default=SNAPSHOT, help="committed texts a new cache file starts from")
    p.add_argument("--no-snapshot", action="store_true", help="generate from prompt 0 (the full recipe)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    generate(a.tokens, a.batch, seed=a.seed, device=a.device, dtype=a.dtype,
             snapshot=None if a.no_snapshot else a.snapshot)


if __name__ == "__main__":
    main()
