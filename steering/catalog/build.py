"""Building the catalog: one pass of the model over mixed-domain corpus text (paper §3.1 SAEs,
feature descriptions as in App. A).

What is collected, in one pass over mixed-domain corpus text (``corpus_sequences``):
- one forward per batch captures every site; each SAE encodes its site; position 0 (the attention
  sink, `steering.sinks`) is never counted;
- per feature, with torch ops over all features at once: firing count, activation sum, the top
  sequences by their max activation (one context per sequence, so contexts are distinct) and the
  top ``N_TOP_ACTS`` token activations (the source of "top tokens");
- afterwards: a window of ``WINDOW`` tokens around each top context's max token (cut at document
  boundaries), the words those contexts share, token-class and domain tags, and the logit lens of
  the decoder direction (``promoted_tokens``).

Labels: written by an LLM (`steering.catalog.labels.llm_labels`) when a client is given at build
time, else derived offline by `steering.catalog.labels.offline_label` (recorded per feature as its
label source).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import torch
from tqdm import tqdm

from .. import limits
from .. import sites as S
from ..features import parse_feature
from ..sinks import DISPLAY_SINK_RATIO, sink_mask
from .labels import LLM_MODEL, llm_item, llm_labels, token_tags
from .store import FORMAT, Catalog, sae_fingerprint
from .words import WORD, text_words, token_strings

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
        from ..training import corpus

        texts = {}
        for d in corpus.DOMAINS:
            try:
                # generated everyday text: the generator's loops left out (`corpus.degenerate`)
                texts[d] = corpus.without_loops(d, corpus.sample_texts(d, 10**6, seed=seed, split="all",
                                                                       min_chars=100), "catalog text")
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



# ---- running statistics (pure tensor functions) -----------------------------------------------

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
        sinks = (sink_mask(torch.stack([store[k] for k in res_keys]), ratio=DISPLAY_SINK_RATIO)[:, 1:].cpu() if res_keys
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
        items = [llm_item(f"{l}/{s}/{i}", cat.card(f"{l}/{s}/{i}")) for (l, s), cols in sorted(summary.items())
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
        "texts": "held-out + train documents of the corpus domains (steering/training/corpus.py; everyday texts "
                 "that corpus.degenerate flags as the generator's loops left out), one random "
                 "window of <= ctx tokens per document, joined with EOS, shuffled" if texts is None
                 else "caller-supplied texts",
        "mix": MIX if texts is None else None,
        "position_0": "skipped (attention sink)",
        "sinks": f"positions whose residual norm is >= {DISPLAY_SINK_RATIO:g}x the row median are skipped too "
                 "(sinks and massive-activation tokens, steering.sinks.DISPLAY_SINK_RATIO) "
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
    cat.derive(embed, query_vocab)
    cat.meta["build_seconds"]["total"] = round(time.time() - t0, 1)
    return cat


def _whole_words(tokens: list[str], first_is_extra: bool, last_is_extra: bool) -> list[str]:
    """Words (``_words``) of a context window that lie whole inside it: ``tokens`` carry one
    extra token at each end (when present) that only tells whether an edge word is cut."""
    text = "".join(tokens).replace("\\n", " ").lower()
    lo = len(tokens[0]) if first_is_extra else 0
    hi = len(text) - (len(tokens[-1]) if last_is_extra else 0)
    return [w for m in WORD.finditer(text) if m.start() >= lo and m.end() <= hi
            for w in text_words(m.group())]


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
        tags = token_tags([(t, s) for t, s in top], Counter(data.domains[r[3]] for r in ctx_rows[f]))
        cols["label"].append("")  # offline label: Catalog.derive
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

