"""Feature catalog: top-activating contexts, activation statistics, labels and search.

    python -m steering.catalog build --preset default --out assets/catalog --tokens 120000

For every feature of every SAE: its top-activating contexts over mixed-domain corpus text (a
window of tokens around the max token, which is highlighted), max activation, firing frequency,
mean non-zero activation, the tokens it fires on most strongly, and the tokens its decoder
direction promotes through the unembedding (logit lens: W_U · final_norm_weight ⊙ d_f). Labels are
derived offline from those tokens (``label_source: offline``), or written by an LLM when
OPENAI_API_KEY is set at build time. Position 0 (the attention sink) is never counted.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import limits
from . import sites as S
from .features import FeatureId, parse_feature

log = logging.getLogger(__name__)
N_CONTEXTS = {"res": 5, "mlp": 3, "attn": 3}
WINDOW = (8, 3)  # tokens before / after the highlighted token
_WORD = re.compile(r"[a-z0-9]+")
_STOP = set("the a an and or of to in on at for is are was were be by with as it this that from "
            "i you he she we they his her its their our my your not no but if then so".split())


@dataclass
class Hit:
    """A search result: feature, its label, a relevance score and why it matched."""

    feature: str
    label: str
    score: float
    matched: list[str] = field(default_factory=list)
    max_act: float = 0.0

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class FeatureCard:
    """Everything the catalog knows about one feature."""

    feature: str
    label: str
    label_source: str
    contexts: list[dict]  # [{"tokens": [...], "index": highlighted position, "act": float}]
    max_act: float
    frequency: float
    mean_act: float
    top_tokens: list[str]
    promoted_tokens: list[str]

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _clean(tok: str) -> str:
    return tok.replace("Ġ", " ").replace("Ċ", "\\n").replace("\n", "\\n")


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1]


def offline_label(top_tokens: list[str], promoted: list[str]) -> str:
    """'fires on: a, b, c · promotes: x, y' from the strongest distinct tokens."""
    fire = [t.strip() for t in top_tokens if t.strip()][:4]
    out = [t.strip() for t in promoted if t.strip()][:3]
    parts = []
    if fire:
        parts.append("fires on: " + ", ".join(dict.fromkeys(fire)))
    if out:
        parts.append("promotes: " + ", ".join(dict.fromkeys(out)))
    return " · ".join(parts) or "(never fired)"


class Catalog:
    """Feature catalog of one preset: ``features[(layer, site)][index] -> dict`` plus an index."""

    def __init__(self, features: dict[tuple[int, str], list[dict]], meta: dict):
        self.features, self.meta = features, meta
        self._index: dict[str, list[tuple[str, float]]] | None = None

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, source) -> "Catalog":
        """From a folder (``assets/catalog``) or a bundle (its preset's assets/catalog)."""
        if hasattr(source, "preset"):
            root = source.preset.assets_root / "catalog"
            if source.preset.name != "default" and not (root / "meta.json").is_file():
                raise FileNotFoundError(f"no catalog for preset {source.preset.name} at {root}")
        else:
            root = Path(source)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"no feature catalog at {root} (build one with python -m steering.catalog build)")
        meta = json.loads((root / "meta.json").read_text())
        features = {}
        for f in sorted(root.glob("*.json.gz")):
            site = f.name.split(".")[0]
            with gzip.open(f, "rt") as fh:
                for layer, rows in json.load(fh).items():
                    features[(int(layer), site)] = rows
        return cls(features, meta)

    def save(self, root: Path) -> list[Path]:
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for site in sorted({s for _, s in self.features}):
            path = root / f"{site}.json.gz"
            data = {str(l): rows for (l, s), rows in sorted(self.features.items()) if s == site}
            with gzip.open(path, "wt", compresslevel=9) as fh:
                json.dump(data, fh, separators=(",", ":"))
            paths.append(path)
        (root / "meta.json").write_text(json.dumps(self.meta, indent=2))
        return paths

    # ---- lookups ---------------------------------------------------------------------------
    def _row(self, fid: FeatureId) -> dict | None:
        rows = self.features.get((fid.layer, fid.site))
        return rows[fid.index] if rows is not None and fid.index < len(rows) else None

    def label(self, fid) -> str:
        row = self._row(parse_feature(fid))
        return row["label"] if row else ""

    def labels(self) -> dict[str, str]:
        return {f"{l}/{s}/{i}": r["label"] for (l, s), rows in self.features.items() for i, r in enumerate(rows)}

    def card(self, fid) -> FeatureCard:
        fid = parse_feature(fid)
        row = self._row(fid)
        if row is None:
            raise ValueError(f"feature {fid} is not in the catalog")
        return FeatureCard(str(fid), row["label"], self.meta.get("label_source", "offline"),
                           [{"tokens": c[0], "index": c[1], "act": c[2]} for c in row["ctx"]],
                           row["max"], row["freq"], row["mean"], row["top"], row["out"])

    # ---- search ----------------------------------------------------------------------------
    def _build_index(self) -> dict[str, list[tuple[str, float]]]:
        index: dict[str, dict[str, float]] = defaultdict(dict)
        for (l, s), rows in self.features.items():
            for i, r in enumerate(rows):
                fid = f"{l}/{s}/{i}"
                weights: dict[str, float] = defaultdict(float)
                for rank, t in enumerate(r["top"]):
                    for w in _words(t):
                        weights[w] += 3.0 / (1 + 0.3 * rank)
                for t in r["out"]:
                    for w in _words(t):
                        weights[w] += 1.5
                for w in _words(r["label"]) if self.meta.get("label_source") == "llm" else []:
                    weights[w] += 3.0
                for c in r["ctx"]:
                    for w in _words("".join(c[0])):
                        weights[w] += 0.5
                for w, x in weights.items():
                    index[w][fid] = x
        return {w: sorted(d.items(), key=lambda kv: -kv[1]) for w, d in index.items()}

    def search(self, query: str, k: int = 20, sites: tuple[str, ...] = ("res",),
               layers: tuple[int, ...] | None = None) -> list[Hit]:
        """Features matching any of the query's words, ranked by how central the words
        are to them (top tokens and label > promoted tokens > context words), then by how many
        query words they match and by max activation."""
        query = limits.clean_text("search query", query, limits.MAX_QUERY_CHARS)
        words = _words(query) or [w for w in _WORD.findall(query.lower())]
        if not words:
            raise ValueError(f"search query {query!r} has no searchable words; type words such as 'wedding'")
        if self._index is None:
            self._index = self._build_index()
        scores: dict[str, float] = defaultdict(float)
        matched: dict[str, list[str]] = defaultdict(list)
        for w in dict.fromkeys(words):
            keys = [w] if w in self._index else [x for x in self._index if x.startswith(w)][:20]
            for key in keys:
                for fid, x in self._index[key]:
                    scores[fid] += x if key == w else 0.6 * x
                    matched[fid].append(key)
        hits = []
        for fid, sc in scores.items():
            f = parse_feature(fid)
            if f.site not in sites or (layers is not None and f.layer not in layers):
                continue
            row = self._row(f)
            bonus = 1.0 + 0.5 * (len(set(matched[fid])) - 1)
            hits.append(Hit(fid, row["label"], round(sc * bonus, 3), sorted(set(matched[fid])), row["max"]))
        hits.sort(key=lambda h: (-h.score, -h.max_act))
        return hits[:k]


# ---- building --------------------------------------------------------------------------------

def corpus_sequences(tokenizer, n_tokens: int, ctx: int = 64, seed: int = 0) -> torch.Tensor:
    """[n_seqs, ctx] token ids from the four domains (held-out + train documents), mixed."""
    from .training import corpus

    per_domain = n_tokens // len(corpus.DOMAINS)
    rows = []
    for domain in corpus.DOMAINS:
        ids: list[int] = []
        for doc in corpus.sample_texts(domain, 5000, seed=seed, split="all", min_chars=100):
            ids += tokenizer(doc)["input_ids"][: 4 * ctx] + [tokenizer.eos_token_id]
            if len(ids) >= per_domain:
                break
        n = len(ids) // ctx
        rows.append(torch.tensor(ids[: n * ctx]).view(n, ctx))
    seqs = torch.cat(rows)
    return seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]


@torch.no_grad()
def promoted_tokens(bundle, layer: int, site: str, k: int = 5) -> list[list[str]]:
    """Logit lens of every decoder direction: top-k tokens of W_U (final_norm_w ⊙ d_f)."""
    model = bundle.model
    W_U = model.get_output_embeddings().weight.float().cpu()  # [vocab, d]
    norm = getattr(model.model, "norm", None)
    scale = norm.weight.float().cpu() if norm is not None else torch.ones(bundle.d_model)
    if bundle.preset.arch == "gemma2":
        scale = 1.0 + scale  # Gemma RMSNorm multiplies by (1 + w)
    logits = (bundle.decoder(layer, site) * scale) @ W_U.T  # [d_sae, vocab]
    top = logits.topk(k, dim=-1).indices
    conv = bundle.tokenizer.convert_ids_to_tokens
    return [[_clean(t) for t in conv(row.tolist())] for row in top]


@torch.no_grad()
def build(bundle, n_tokens: int = 120_000, ctx: int = 64, batch: int = 32, seed: int = 0,
          sites: tuple[str, ...] | None = None) -> Catalog:
    """Run the model over corpus text once and collect every feature's catalog entry."""
    keys = sorted(k for k in bundle.saes if sites is None or k[1] in sites)
    seqs = corpus_sequences(bundle.tokenizer, n_tokens, ctx, seed)
    n_top = max(N_CONTEXTS.values()) * 2
    top_act = {k: torch.zeros(n_top, bundle.width(*k)) for k in keys}  # [n_top, w]
    top_pos = {k: torch.zeros(n_top, bundle.width(*k), dtype=torch.long) for k in keys}  # flat token index
    count = {k: torch.zeros(bundle.width(*k)) for k in keys}
    total = {k: torch.zeros(bundle.width(*k)) for k in keys}
    mods = {k: bundle.module(*k) for k in keys}
    n_seen = 0
    for i in tqdm(range(0, len(seqs), batch), desc="catalog"):
        ids = seqs[i:i + batch]
        store: dict = {}
        with bundle.lock, S.capture_sites(mods, store):
            bundle.model.model(input_ids=ids.to(bundle.device))
        flat = (torch.arange(i, i + len(ids))[:, None] * ctx + torch.arange(1, ctx)[None, :]).reshape(-1)  # [N]
        for k in keys:
            z = bundle.encode(*k, store[k][:, 1:].reshape(-1, bundle.d_model)).cpu()  # [N, w] without position 0
            count[k] += (z > 0).sum(0)
            total[k] += z.sum(0)
            kk = min(n_top, z.shape[0])
            a, j = z.topk(kk, dim=0)  # [kk, w]
            cat_a = torch.cat([top_act[k], a])
            cat_p = torch.cat([top_pos[k], flat[j]])
            best = cat_a.topk(n_top, dim=0).indices
            top_act[k], top_pos[k] = cat_a.gather(0, best), cat_p.gather(0, best)
        n_seen += len(ids) * (ctx - 1)
    conv = bundle.tokenizer.convert_ids_to_tokens
    flat_ids = seqs.reshape(-1)
    features: dict[tuple[int, str], list[dict]] = {}
    for k in tqdm(keys, desc="labels"):
        promoted = promoted_tokens(bundle, *k)
        rows = []
        for f in range(bundle.width(*k)):
            acts, poss = top_act[k][:, f].tolist(), top_pos[k][:, f].tolist()
            ctxs, tops, seen_seq = [], Counter(), set()
            for a, p in zip(acts, poss):
                if a <= 0:
                    break
                tops[_clean(conv(int(flat_ids[p])))] += a
                seq, pos = divmod(p, ctx)
                if seq in seen_seq or len(ctxs) >= N_CONTEXTS[k[1]]:
                    continue
                seen_seq.add(seq)
                lo, hi = max(1, pos - WINDOW[0]), min(ctx, pos + WINDOW[1] + 1)
                toks = [_clean(t) for t in conv(seqs[seq, lo:hi].tolist())]
                ctxs.append([toks, pos - lo, round(a, 3)])
            top = [t for t, _ in tops.most_common(5)]
            n = float(count[k][f])
            rows.append({"label": offline_label(top, promoted[f]), "max": round(float(top_act[k][0, f]), 3),
                         "freq": round(n / n_seen, 6), "mean": round(float(total[k][f]) / max(n, 1), 3),
                         "ctx": ctxs, "top": top, "out": promoted[f]})
        features[k] = rows
    meta = {"preset": bundle.preset.name, "tokens": n_seen, "ctx": ctx, "seed": seed, "label_source": "offline",
            "built": datetime.date.today().isoformat(),
            "texts": "four corpus domains (steering/training/corpus.py), held-out and train documents mixed",
            "label_rule": "offline_label(): strongest activating tokens + logit-lens promoted tokens"}
    return Catalog(features, meta)


@torch.no_grad()
def features_for_text(bundle, text: str, k: int = 10, sites: tuple[str, ...] = ("res",)) -> dict:
    """Features most active on a text: per token the top-k (feature, activation), and overall
    the top-k features by max activation (with the token where it peaks). Position 0 skipped."""
    text = limits.clean_text("text", text, limits.MAX_PROMPT_CHARS)
    limits.check_int("k", k, 1, 100)
    enc = bundle.tokenize([text])
    n_tok = enc["input_ids"].shape[1]
    if n_tok > limits.MAX_PROMPT_TOKENS:
        raise ValueError(f"text is {n_tok} tokens; allowed: at most {limits.MAX_PROMPT_TOKENS}")
    keys = [key for key in sorted(bundle.saes) if key[1] in sites]
    store, _ = bundle.activations(enc, keys)
    tokens = [_clean(t) for t in bundle.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())]
    per_token: list[list] = [[] for _ in tokens]
    best: list[tuple[str, float, int]] = []
    for key in keys:
        z = bundle.encode(*key, store[key][0]).cpu()  # [seq, w]
        z[0] = 0  # attention sink
        a, j = z.topk(min(k, z.shape[1]), dim=-1)
        for t in range(1, len(tokens)):
            per_token[t] += [(f"{key[0]}/{key[1]}/{int(f)}", round(float(v), 3)) for v, f in zip(a[t], j[t]) if v > 0]
        m, where = z.max(0)
        for f in m.topk(min(k, len(m))).indices.tolist():
            if m[f] > 0:
                best.append((f"{key[0]}/{key[1]}/{f}", round(float(m[f]), 3), int(where[f])))
    per_token = [sorted(p, key=lambda x: -x[1])[:k] for p in per_token]
    best.sort(key=lambda x: -x[1])
    return {"tokens": tokens, "per_token": per_token, "top": best[:k]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="build the feature catalog of a preset")
    p.add_argument("command", choices=["build", "search"])
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=120_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from .bundle import Bundle

    bundle = Bundle.load(a.preset, progress=lambda it: tqdm(it, desc="loading SAEs"))
    out = a.out or bundle.preset.assets_root / "catalog"
    if a.command == "build":
        cat = build(bundle, a.tokens, seed=a.seed)
        paths = cat.save(out)
        print(json.dumps({"files": {str(p): p.stat().st_size for p in paths}, **cat.meta}, indent=2))
    else:
        for h in Catalog.load(out).search(a.query):
            print(f"{h.feature:>14}  {h.score:7.2f}  {h.label}")


if __name__ == "__main__":
    main()
