"""Feature matching and flow graphs (paper §3.2-3.3, App. B.2).

Matching is data-free: a feature's embedding is its unit decoder direction, and the match of
feature f (site A) in site B is argmax_k cos(f, W_dec(B)[k]) (top-1, many-to-one).

Relations used to build a graph from a seed in R_l:
- backward (predecessor): f in R_l -> argmax_k cos(f, W_dec(R_{l-1})[k]); also the best matches
  in M_l and A_l. Their cosines are the predecessor scores s(R), s(M), s(A) of f.
- forward (successor): f in R_l -> argmax_k cos(f, W_dec(R_{l+1})[k]), the top-1 from f into
  the next residual SAE. This is NOT the inverse of the backward relation: the successor g's own
  backward top-1 in R_l can be a different feature than f (tests/test_flow.py has such a case).
  Every node's s_res is the backward score s(R) (the cosine to *its own* best predecessor); the
  forward edge carries cos(f, g), which is <= s(R) of g.

All-features match tables (every feature of a site -> its match in a neighbouring site) are
computed once per bundle with chunked matmuls (`match_tables`, decoders only, no model) and
cached in the bundle (`Bundle.cached`), so a graph is built from lookups.

Matching methods (paper §5.2 compares them; top-1 cosine is the default everywhere):
``top1_cosine``, ``top5_cosine`` (k = 5 candidates), ``random_top5`` (one of the top 5, seeded),
``permutation`` (one-to-one, Hungarian; Balagansky et al. 2024) and ``top1_pearson`` (top-1
correlation of activations on given texts: data-based, see `pearson_tables`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, NamedTuple

import torch

from .features import FeatureId, parse_feature
from .graph import FlowEdge, FlowGraph, FlowNode
from .settings import T_MODULE, T_RES, check_choice

log = logging.getLogger(__name__)
METHODS = ("top1_cosine", "top5_cosine", "random_top5", "permutation", "top1_pearson")
GRAPH_METHODS = ("top1_cosine", "random_top5", "permutation", "top1_pearson")  # one match per feature
DIRECTIONS = ("both", "backward", "forward")
CHUNK = 2048
Key = tuple[int, str]  # (layer, site)
Pair = tuple[Key, Key]  # (source site, destination site)


class Match(NamedTuple):
    """Matches of every source feature in a destination site.

    index: [n_src] (or [n_src, k] for top-k) long; cosine: the same shape, the match score (the
    decoder cosine; for ``top1_pearson`` the activation correlation)."""

    index: torch.Tensor
    cosine: torch.Tensor


# ---- pure tensor matching ------------------------------------------------------------------

def chance_top1(n_dst: int, d: int, n_src: int = 2000, seed: int = 0) -> torch.Tensor:
    """Top-1 cosines of ``n_src`` random unit directions against ``n_dst`` others in d dims  # [n_src]

    The chance level of a match score: about sqrt(2 ln n_dst / d) (0.14 for 1,536 directions in
    576 dimensions); a score near it is no match (paper §3.2 matching)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n_src, d, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(n_dst, d, generator=g), dim=-1)
    return (a @ b.T).max(-1).values


def chance_levels(bundle) -> dict[Key, float]:
    """Chance cosine of a match into each SAE, ``{(layer, site): median top-1 cosine}``: a match
    from a feature into an SAE of n features in d dimensions is compared with the best of n random
    unit directions in d dimensions (`chance_top1`). A flow-graph link between two layers is a match
    into the SAE of one of them, so this is the chance level of each layer pair. Cached (computed
    once per distinct width)."""

    def compute() -> dict[Key, float]:
        by_width: dict[int, float] = {}
        out = {}
        for key in sorted(bundle.saes):
            n = bundle.width(*key)
            if n not in by_width:
                by_width[n] = round(float(chance_top1(n, bundle.d_model, 1000).median()), 3)
            out[key] = by_width[n]
        return out

    return bundle.cached(("chance", "per-sae"), compute)


def _check_dims(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dim() != 2 or dst.dim() != 2 or src.shape[-1] != dst.shape[-1]:
        raise ValueError(f"cannot match directions of shape {tuple(src.shape)} with {tuple(dst.shape)}: "
                         "need [n, d] and [m, d]; only SAEs trained on the same space can be matched (paper §3.2)")


def match_topk(src: torch.Tensor, dst: torch.Tensor, k: int, chunk: int = CHUNK) -> Match:
    """Top-k cosine matches of each row of ``src`` among the rows of ``dst`` (both unit norm).

    src [n, d], dst [m, d] -> index [n, k], cosine [n, k]. Chunked over src rows so memory stays
    at chunk x m.
    """
    _check_dims(src, dst)
    if not 1 <= k <= dst.shape[0]:
        raise ValueError(f"k must be in 1..{dst.shape[0]} (destination width), got {k}")
    idx, cos = [], []
    for i in range(0, src.shape[0], chunk):
        c, j = (src[i:i + chunk] @ dst.T).topk(k, dim=-1)  # [chunk, k]
        idx.append(j)
        cos.append(c)
    return Match(torch.cat(idx), torch.cat(cos))


def match_top1(src: torch.Tensor, dst: torch.Tensor, chunk: int = CHUNK) -> Match:
    """Top-1 match j = argmax_k cos(f, dst[k]) of every row f of src (paper §3.2).

    src [n, d], dst [m, d] (unit norm) -> index [n], cosine [n]."""
    m = match_topk(src, dst, 1, chunk)
    return Match(m.index[:, 0], m.cosine[:, 0])


def match_top1_both(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> tuple[Match, Match]:
    """Top-1 matches a -> b and b -> a from one pass over the cosine matrix (the two are
    different relations, but share cos(a_i, b_j)). a [n, d], b [m, d] -> ([n], [m])."""
    _check_dims(a, b)
    idx, cos = [], []
    best = torch.full((b.shape[0],), -2.0)  # running column max over chunks of a
    arg = torch.zeros(b.shape[0], dtype=torch.long)
    for i in range(0, a.shape[0], chunk):
        sim = a[i:i + chunk] @ b.T  # [chunk, m]
        c, j = sim.max(dim=1)
        idx.append(j)
        cos.append(c)
        cc, jj = sim.max(dim=0)  # [m]
        better = cc > best
        best = torch.where(better, cc, best)
        arg = torch.where(better, jj + i, arg)
    return Match(torch.cat(idx), torch.cat(cos)), Match(arg, best)


def permutation_match(src: torch.Tensor, dst: torch.Tensor) -> Match:
    """One-to-one matching maximizing total cosine (Balagansky et al. 2024): the Hungarian
    algorithm on -cos (``scipy.optimize.linear_sum_assignment``), square or rectangular.

    With more sources than destinations, the sources left unassigned fall back to top-1."""
    from scipy.optimize import linear_sum_assignment

    _check_dims(src, dst)
    sim = (src @ dst.T).double().numpy()  # [n, m]
    rows, cols = linear_sum_assignment(-sim)
    index, cosine = match_top1(src, dst)
    index[torch.as_tensor(rows)] = torch.as_tensor(cols)
    cosine[torch.as_tensor(rows)] = torch.as_tensor(sim[rows, cols], dtype=cosine.dtype)
    return Match(index, cosine)


def random_top5(src: torch.Tensor, dst: torch.Tensor, seed: int = 0) -> Match:
    """One of the top-5 cosine matches of each source, uniformly at random (seeded)."""
    top = match_topk(src, dst, min(5, dst.shape[0]))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, top.index.shape[1], (src.shape[0], 1), generator=gen)  # [n, 1]
    return Match(top.index.gather(1, pick)[:, 0], top.cosine.gather(1, pick)[:, 0])


def pearson_match(src_acts: torch.Tensor, dst_acts: torch.Tensor, chunk: int = CHUNK) -> Match:
    """Top-1 Pearson correlation of feature activations over tokens (data-based matching, §5.2).

    src_acts [N, n], dst_acts [N, m] (activations of the two SAEs at the same N tokens) ->
    index [n], cosine [n] = the correlation. Features that never vary get correlation 0."""
    if src_acts.dim() != 2 or dst_acts.dim() != 2 or src_acts.shape[0] != dst_acts.shape[0]:
        raise ValueError(f"need activations [N, n] and [N, m] on the same N tokens, got "
                         f"{tuple(src_acts.shape)} and {tuple(dst_acts.shape)}")
    if src_acts.shape[0] < 2:
        raise ValueError("Pearson matching needs activations on at least 2 tokens")

    def standardize(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        x = x - x.mean(dim=0)
        norm = x.norm(dim=0)
        return (x / torch.where(norm > 0, norm, torch.ones_like(norm))).float()  # unit columns

    a, b = standardize(src_acts), standardize(dst_acts)  # [N, n], [N, m]
    return match_top1(a.T.contiguous(), b.T.contiguous(), chunk)


def match(src: torch.Tensor, dst: torch.Tensor, method: str = "top1_cosine", seed: int = 0) -> Match:
    """Matches of every src feature (unit decoder rows) in dst by one of the data-free METHODS.

    top1_cosine (default) -> [n]; top5_cosine -> [n, 5]; random_top5 -> [n] (seeded);
    permutation -> [n], one-to-one. ``top1_pearson`` needs activations: see `pearson_match`.
    """
    check_choice("matching method", method, METHODS)
    if method == "top1_pearson":
        raise ValueError("top1_pearson is data-based: compute it with pearson_tables(bundle, texts) "
                         "(or pearson_match on activations), not from decoders")
    if method == "top1_cosine":
        return match_top1(src, dst)
    if method == "top5_cosine":
        return match_topk(src, dst, min(5, dst.shape[0]))
    if method == "random_top5":
        return random_top5(src, dst, seed)
    return permutation_match(src, dst)


# ---- all-features tables -------------------------------------------------------------------

def neighbour_pairs(keys: Iterable[Key]) -> list[Pair]:
    """The (src, dst) site pairs a flow graph looks up, for the sites ``keys`` that have SAEs:
    R_l -> R_{l-1}, M_l, A_l (predecessors) and R_l -> R_{l+1} (successors)."""
    keys = set(keys)
    pairs = []
    for l in sorted(k[0] for k in keys if k[1] == "res"):
        for dst in ((l - 1, "res"), (l, "mlp"), (l, "attn"), (l + 1, "res")):
            if dst in keys:
                pairs.append(((l, "res"), dst))
    return pairs


def _pair_seed(seed: int, pair: Pair) -> int:
    (l1, s1), (l2, s2) = pair
    return seed * 1_000_003 + (l1 * 3 + "rma".index(s1[0])) * 1009 + l2 * 3 + "rma".index(s2[0])


def match_tables(decoders: dict[Key, torch.Tensor], method: str = "top1_cosine",
                 pairs: Iterable[Pair] | None = None, seed: int = 0,
                 progress: Callable[[Iterable], Iterable] | None = None) -> dict[Pair, Match]:
    """Match tables from decoders alone (no model): ``{(src, dst): Match}`` for ``pairs``
    (default `neighbour_pairs`). ``decoders[(layer, site)]`` are unit rows [d_sae, d_model].

    For top1_cosine, R_l -> R_{l+1} and R_{l+1} -> R_l come from one pass over their cosine
    matrix (`match_top1_both`). random_top5 is seeded per pair from ``seed``.
    """
    pairs = list(neighbour_pairs(decoders) if pairs is None else pairs)
    out: dict[Pair, Match] = {}
    for src, dst in (progress(pairs) if progress else pairs):
        if (src, dst) in out:
            continue
        if method == "top1_cosine" and (dst, src) in pairs:
            out[(src, dst)], out[(dst, src)] = match_top1_both(decoders[src], decoders[dst])
        else:
            out[(src, dst)] = match(decoders[src], decoders[dst], method, _pair_seed(seed, (src, dst)))
    return out


def table(bundle, src: Key, dst: Key, method: str = "top1_cosine") -> Match:
    """Cached match table of a bundle: every feature of site ``src`` -> its match in ``dst``.

    ``top1_pearson`` tables exist only after `pearson_tables` computed them from texts."""
    key = ("match", src, dst, method)
    if method == "top1_pearson" and not bundle.has_cached(key):
        raise ValueError(f"no top1_pearson table for {src} -> {dst}: call "
                         "steering.flow.pearson_tables(bundle, texts) first (data-based matching)")
    return bundle.cached(key, lambda: match(bundle.decoder(*src), bundle.decoder(*dst), method,
                                            _pair_seed(0, (src, dst))))


def build_tables(bundle, method: str = "top1_cosine", progress=None) -> int:
    """Compute and cache every table a flow graph needs (start-up, benchmarks); returns the count."""
    pairs = [p for p in neighbour_pairs(bundle.saes) if not bundle.has_cached(("match", *p, method))]
    if method == "top1_pearson" and pairs:
        raise ValueError("top1_pearson tables are data-based: use pearson_tables(bundle, texts)")
    decoders = {k: bundle.decoder(*k) for p in pairs for k in p}
    for pair, m in match_tables(decoders, method, pairs, progress=progress).items():
        bundle.put_cached(("match", *pair, method), m)
    return len(neighbour_pairs(bundle.saes))


@torch.no_grad()
def pearson_tables(bundle, texts: list[str], layers: Iterable[int] | None = None, max_tokens: int = 4096,
                   max_length: int = 256, batch_size: int = 8) -> dict[Pair, Match]:
    """Top-1 Pearson correlation tables (data-based matching, paper §5.2) for the neighbour pairs
    of residual layers ``layers`` (default all), from SAE activations on ``texts``; cached in the
    bundle under method ``top1_pearson`` (a later call replaces them).

    Tokens: every non-padding position except 0 (the attention sink, `steering.sinks`), up to
    ``max_tokens``. Memory: max_tokens x (sum of the widths involved) x 2 bytes (fp16 storage).
    """
    if not texts:
        raise ValueError("pearson_tables needs at least one text")
    want = set(bundle.layers if layers is None else layers)
    pairs = [p for p in neighbour_pairs(bundle.saes) if p[0][0] in want]
    keys = sorted({k for p in pairs for k in p})
    if not pairs:
        raise ValueError(f"no residual SAE at layers {sorted(want)}; layers: {list(bundle.layers)}")
    if any(bundle.is_approx(s) for _, s in keys):
        raise ValueError("top1_pearson needs SAEs that read their own site; approximate sites: "
                         + ", ".join(sorted({s for _, s in keys if bundle.is_approx(s)})))
    codes: dict[Key, list[torch.Tensor]] = {k: [] for k in keys}
    n = 0
    for i in range(0, len(texts), batch_size):
        enc = bundle.tokenize(texts[i:i + batch_size], max_length=max_length)
        store, _ = bundle.activations(enc, keys)
        mask = enc["attention_mask"].bool().clone()  # [b, seq]
        mask[torch.arange(mask.shape[0]), mask.int().argmax(dim=1)] = False  # first real token (any padding side)
        take = min(int(mask.sum()), max_tokens - n)
        for k in keys:
            codes[k].append(bundle.encode(*k, store[k][mask][:take]).half().cpu())  # [take, d_sae]
        n += take
        if n >= max_tokens:
            break
    acts = {k: torch.cat(v).float() for k, v in codes.items()}
    out = {}
    for pair in pairs:
        out[pair] = pearson_match(acts[pair[0]], acts[pair[1]])
        bundle.put_cached(("match", *pair, "top1_pearson"), out[pair])
    log.info("top1_pearson tables for %d pairs from %d tokens", len(pairs), n)
    return out


# ---- predecessor scores and successors ------------------------------------------------------

class Neighbours(NamedTuple):
    """Top-1 matches of a residual feature in the three sites before it (predecessors: R_{l-1},
    M_l, A_l) or after it (successors: R_{l+1}, M_{l+1}, A_{l+1}); ``(feature, score)`` or None
    where the site has no SAE (e.g. R_{-1} for layer 0)."""

    res: tuple[FeatureId, float] | None
    mlp: tuple[FeatureId, float] | None
    attn: tuple[FeatureId, float] | None



def _lookup(bundle, f: FeatureId, dst: Key, method: str) -> tuple[FeatureId, float] | None:
    if dst not in bundle.saes:
        return None
    t = table(bundle, (f.layer, f.site), dst, method)
    return FeatureId(dst[0], dst[1], int(t.index[f.index])), float(t.cosine[f.index])


def _residual(bundle, fid, what: str) -> FeatureId:
    f = parse_feature(fid, bundle)
    if f.site != "res":
        raise ValueError(f"{what} are defined for residual features (layer/res/index), got {f}")
    return f


def predecessors(bundle, fid: FeatureId | str, method: str = "top1_cosine") -> Neighbours:
    """Top-1 predecessors of f in R_l and their scores s(P) = max_k cos(f, W_dec(P)[k]) for
    P in R_{l-1}, M_l, A_l (paper §3.3). Layer 0 has no R_{-1}: ``res`` is None."""
    f = _residual(bundle, fid, "predecessor scores")
    return Neighbours(*(_lookup(bundle, f, dst, method)
                        for dst in ((f.layer - 1, "res"), (f.layer, "mlp"), (f.layer, "attn"))))


def successors(bundle, fid: FeatureId | str, method: str = "top1_cosine") -> Neighbours:
    """Forward relation: top-1 from f in R_l into R_{l+1}, M_{l+1}, A_{l+1} (None past the last
    layer). Not the inverse of `predecessors` (module docstring)."""
    f = _residual(bundle, fid, "successors")
    return Neighbours(*(_lookup(bundle, f, dst, method)
                        for dst in ((f.layer + 1, "res"), (f.layer + 1, "mlp"), (f.layer + 1, "attn"))))


def successor(bundle, fid: FeatureId | str, method: str = "top1_cosine") -> tuple[FeatureId, float] | None:
    """The residual successor only: argmax_k cos(f, W_dec(R_{l+1})[k]) (None at the last layer)."""
    f = _residual(bundle, fid, "successors")
    return _lookup(bundle, f, (f.layer + 1, "res"), method)


# ---- the flow graph ------------------------------------------------------------------------

def _residual_seed(bundle, seed: FeatureId) -> tuple[FeatureId, float, list[str]]:
    """A graph is a residual chain: an mlp/attn seed in layer l starts from its top-1 cosine
    match in R_l (the residual stream it writes into)."""
    if seed.site == "res":
        return seed, 1.0, []
    m = match_top1(bundle.decoder(seed.layer, seed.site)[seed.index:seed.index + 1],
                   bundle.decoder(seed.layer, "res"))
    res, cos = FeatureId(seed.layer, "res", int(m.index[0])), float(m.cosine[0])
    return res, cos, [f"seed {seed} is a {seed.site} feature: the chain starts from its top-1 residual "
                      f"match {res} (cosine {cos:.2f})"]


def _check_threshold(name: str, t) -> None:
    if not (isinstance(t, (int, float)) and -1.0 <= t <= 1.0):
        raise ValueError(f"{name} must be a cosine threshold in [-1, 1], got {t!r}")


def build_flow_graph(bundle, seed: FeatureId | str, t_res: float = T_RES, t_module: float = T_MODULE,
                     direction: str = "both", catalog_labels: dict[str, str] | None = None,
                     method: str = "top1_cosine") -> FlowGraph:
    """Flow graph of ``seed`` (paper §3.3 "Long-range feature flows", App. B.2).

    - Backward: from the residual node f at layer l, its predecessor is the top-1 match in
      R_{l-1}, repeated down to the first layer with a residual SAE.
    - Forward: its successor is the top-1 match from f into R_{l+1}, repeated up to the last layer.
      Not the inverse of backward (module docstring).
    - Every residual node gets s(R), s(M), s(A) (`predecessors`). Its ``score`` is the cosine of
      its chain link toward the seed (1 for the seed).
    - Cut (App. B.2): l_start..l_end is the contiguous span around the seed layer whose links are
      >= t_res (backward links are s(R) of the later node; forward links are cos(f, successor)).
      Nodes outside stay in the graph with in_span=False (the UI shows them faded).
    - MLP/attention predecessors of every residual node whose score is >= t_module are nodes too,
      with an edge into that residual node.
    - An mlp/attn seed starts the chain from its top-1 residual match in the same layer
      (`_residual_seed`, recorded in ``notes``); the seed is kept as a node with an edge into it.
    - Nodes at approximate sites (``bundle.is_approx``) have approx=True and a note.

    ``catalog_labels`` (``{"layer/site/index": label}``) fills node labels. ``method`` is one of
    GRAPH_METHODS (one match per feature).
    """
    check_choice("direction", direction, DIRECTIONS)
    check_choice("graph matching method", method, GRAPH_METHODS)
    _check_threshold("t_res", t_res)
    _check_threshold("t_module", t_module)
    labels = catalog_labels or {}
    seed = parse_feature(seed, bundle)
    start, seed_cos, notes = _residual_seed(bundle, seed)
    chain: dict[int, FeatureId] = {start.layer: start}
    edges: list[FlowEdge] = []
    if direction in ("both", "backward"):
        f = start
        while (p := predecessors(bundle, f, method).res) is not None:
            edges.append(FlowEdge(p[0], f, p[1]))
            chain[p[0].layer] = f = p[0]
    if direction in ("both", "forward"):
        f = start
        while (s := successor(bundle, f, method)) is not None:
            edges.append(FlowEdge(f, s[0], s[1]))
            chain[s[0].layer] = f = s[0]
    preds = {l: predecessors(bundle, f, method) for l, f in chain.items()}
    link = {e.target.layer: e.cosine for e in edges}  # cosine of the chain link ending at a layer
    l_start = l_end = start.layer
    while l_start - 1 in chain and link[l_start] >= t_res:
        l_start -= 1
    while l_end + 1 in chain and link[l_end + 1] >= t_res:
        l_end += 1

    def node(fid: FeatureId, score: float, role: str, **kw) -> FlowNode:
        return FlowNode(id=fid, score=score, role=role, label=labels.get(str(fid), ""),
                        approx=bool(bundle.is_approx(fid.site)), **kw)

    nodes: list[FlowNode] = []
    for l in sorted(chain):
        f, p = chain[l], preds[l]
        in_span = l_start <= l <= l_end
        score = 1.0 if l == start.layer else link[l + 1] if l < start.layer else link[l]
        nodes.append(node(f, score, "seed" if f == seed else "residual", in_span=in_span,
                          s_res=p.res[1] if p.res else None, s_mlp=p.mlp[1] if p.mlp else None,
                          s_attn=p.attn[1] if p.attn else None))
        for site in ("mlp", "attn"):
            m = getattr(p, site)
            if m is not None and m[1] >= t_module:
                nodes.append(node(m[0], m[1], "seed" if m[0] == seed else site, in_span=in_span))
                edges.append(FlowEdge(m[0], f, m[1]))
    if seed != start and seed not in {n.id for n in nodes}:  # the seed is not a kept predecessor of start
        nodes.append(node(seed, 1.0, "seed"))
        edges.append(FlowEdge(seed, start, seed_cos))
    for site in ("mlp", "attn"):
        if bundle.is_approx(site) and any(n.site == site for n in nodes):
            notes.append(f"{site} matches use an approximation: {bundle.is_approx(site)}")
    return FlowGraph(seed, nodes, edges, l_start, l_end, t_res, t_module, method, notes)
