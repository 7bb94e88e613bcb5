"""Feature matching and flow graphs (paper §3.2-3.3, App. B.2; METHOD.md "Matching", "Flow graph").

Matching is data-free: a feature's embedding is its unit decoder direction, and the match of
feature f (site A) in site B is argmax_k cos(f, W_dec(B)[k]) (top-1, many-to-one).

Relations used to build a graph from a seed in R_l:
- backward (predecessor): f in R_l -> argmax_k cos(f, W_dec(R_{l-1})[k]); also the best matches
  in M_l and A_l. Their cosines are the predecessor scores s(R), s(M), s(A) of f.
- forward (successor): f in R_l -> argmax_k cos(f, W_dec(R_{l+1})[k]), the top-1 from f into
  the next residual SAE. This is NOT the inverse of the backward relation: the successor g's own
  backward top-1 in R_l can be a different feature than f (tests/test_flow.py has such a case).
  We report every node's s(R) with the backward definition, so a forward node's score is the
  cosine to *its* best predecessor, and the edge carries cos(f, g).

All-features match tables (every feature of a site -> its top-1 in a neighbouring site) are
computed once per bundle with chunked matmuls and cached, so a graph is built from lookups.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from .features import FeatureId, parse_feature
from .graph import FlowEdge, FlowGraph, FlowNode

log = logging.getLogger(__name__)
METHODS = ("top1_cosine", "top5_cosine", "random_top5", "permutation")
DIRECTIONS = ("both", "backward", "forward")
CHUNK = 4096


class Match(NamedTuple):
    """Best matches of every source feature in a destination site."""

    index: torch.Tensor  # [n_src] long
    cosine: torch.Tensor  # [n_src] float


def cosine_topk(src: torch.Tensor, dst: torch.Tensor, k: int = 1, chunk: int = CHUNK) -> Match:
    """Top-k cosine matches of each row of ``src`` among rows of ``dst`` (both unit norm).

    src [n, d], dst [m, d] -> index [n, k], cosine [n, k] (k=1: squeezed to [n]). Chunked over
    src rows so memory stays at chunk x m.
    """
    if src.shape[-1] != dst.shape[-1]:
        raise ValueError(f"cannot match {src.shape[-1]}-d directions with {dst.shape[-1]}-d ones: "
                         "only SAEs trained on the same space can be matched (paper §3.2)")
    idx, cos = [], []
    for i in range(0, src.shape[0], chunk):
        c, j = (src[i:i + chunk] @ dst.T).topk(k, dim=-1)  # [chunk, k]
        idx.append(j)
        cos.append(c)
    index, cosine = torch.cat(idx), torch.cat(cos)
    return Match(index[:, 0], cosine[:, 0]) if k == 1 else Match(index, cosine)


def permutation_match(src: torch.Tensor, dst: torch.Tensor) -> Match:
    """One-to-one matching maximizing total cosine (Balagansky et al. 2024), Hungarian algorithm.

    With fewer destination features than sources, unmatched sources fall back to top-1."""
    from scipy.optimize import linear_sum_assignment

    sim = (src @ dst.T).double().numpy()  # [n, m]
    rows, cols = linear_sum_assignment(-sim)
    fallback = cosine_topk(src, dst)
    index, cosine = fallback.index.clone(), fallback.cosine.clone()
    index[torch.as_tensor(rows)] = torch.as_tensor(cols)
    cosine[torch.as_tensor(rows)] = torch.as_tensor(sim[rows, cols], dtype=cosine.dtype)
    return Match(index, cosine)


def match(src: torch.Tensor, dst: torch.Tensor, method: str = "top1_cosine", seed: int = 0) -> Match:
    """Matches of every src feature in dst by one of METHODS (paper §5.2 compares them).

    top1_cosine (default); top5_cosine returns [n, 5]; random_top5 picks one of the top 5 at random
    (seeded); permutation is one-to-one.
    """
    if method == "top1_cosine":
        return cosine_topk(src, dst)
    if method == "top5_cosine":
        return cosine_topk(src, dst, k=min(5, dst.shape[0]))
    if method == "random_top5":
        top = cosine_topk(src, dst, k=min(5, dst.shape[0]))
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, top.index.shape[1], (src.shape[0], 1), generator=gen)
        return Match(top.index.gather(1, pick)[:, 0], top.cosine.gather(1, pick)[:, 0])
    if method == "permutation":
        return permutation_match(src, dst)
    raise ValueError(f"unknown matching method {method!r}; valid: {', '.join(METHODS)}")


# ---- cached all-features tables ------------------------------------------------------------

def table(bundle, src: tuple[int, str], dst: tuple[int, str], method: str = "top1_cosine") -> Match:
    """Cached match table: every feature of site ``src`` -> its match in site ``dst``."""
    key = ("match", src, dst, method)
    if key not in bundle._cache:
        bundle._cache[key] = match(bundle.decoder(*src), bundle.decoder(*dst), method)
    return bundle._cache[key]


def neighbour_pairs(bundle) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """The (src, dst) site pairs a flow graph looks up: R_l -> R_{l-1}, M_l, A_l and R_l -> R_{l+1}."""
    pairs = []
    layers = set(bundle.layers)
    for l in sorted(layers):
        if (l, "res") not in bundle.saes:
            continue
        for dst in ((l - 1, "res"), (l, "mlp"), (l, "attn"), (l + 1, "res")):
            if dst in bundle.saes:
                pairs.append(((l, "res"), dst))
    return pairs


def build_tables(bundle, method: str = "top1_cosine", progress=None) -> int:
    """Compute every table a flow graph needs (for start-up or benchmarks); returns the count."""
    pairs = neighbour_pairs(bundle)
    for src, dst in (progress(pairs) if progress else pairs):
        table(bundle, src, dst, method)
    return len(pairs)


# ---- predecessor scores and the graph ------------------------------------------------------

class Predecessors(NamedTuple):
    """Top-1 predecessors of a residual feature f in R_l and their cosines s(R), s(M), s(A)."""

    res: tuple[FeatureId, float] | None
    mlp: tuple[FeatureId, float] | None
    attn: tuple[FeatureId, float] | None


def predecessors(bundle, fid: FeatureId | str) -> Predecessors:
    """s(P) = max_k cos(f, W_dec(P)[k]) for P in R_{l-1}, M_l, A_l (paper §3.3)."""
    f = parse_feature(fid, bundle)
    if f.site != "res":
        raise ValueError(f"predecessor scores are defined for residual features, got {f}")
    out = {}
    for name, dst in (("res", (f.layer - 1, "res")), ("mlp", (f.layer, "mlp")), ("attn", (f.layer, "attn"))):
        if dst in bundle.saes:
            t = table(bundle, (f.layer, "res"), dst)
            out[name] = (FeatureId(dst[0], dst[1], int(t.index[f.index])), float(t.cosine[f.index]))
        else:
            out[name] = None
    return Predecessors(**out)


def successor(bundle, fid: FeatureId) -> tuple[FeatureId, float] | None:
    """Forward relation: top-1 from f in R_l into R_{l+1} (None at the last layer)."""
    dst = (fid.layer + 1, "res")
    if dst not in bundle.saes:
        return None
    t = table(bundle, (fid.layer, "res"), dst)
    return FeatureId(dst[0], "res", int(t.index[fid.index])), float(t.cosine[fid.index])


def _residual_seed(bundle, seed: FeatureId) -> tuple[FeatureId, list[str]]:
    """A graph is a residual chain: an mlp/attn seed starts from its top-1 match in R_l."""
    if seed.site == "res":
        return seed, []
    m = cosine_topk(bundle.decoder(seed.layer, seed.site)[seed.index:seed.index + 1], bundle.decoder(seed.layer, "res"))
    res = FeatureId(seed.layer, "res", int(m.index[0]))
    return res, [f"seed {seed} is a {seed.site} feature: the chain starts from its top-1 residual match "
                 f"{res} (cosine {float(m.cosine[0]):.2f})"]


def build_flow_graph(bundle, seed: FeatureId | str, t_res: float = 0.5, t_module: float = 0.15,
                     direction: str = "both", labels: dict[str, str] | None = None) -> FlowGraph:
    """Flow graph of ``seed`` (paper §3.3 "Long-range feature flows", App. B.2).

    A residual node's ``score`` is the cosine of its chain link toward the seed (to its
    successor for nodes before the seed, from its predecessor after it; 1 for the seed);
    ``s_res`` is always the backward top-1 score s(R).

    Composes top-1 matches backward to the first layer and forward to the last (module
    docstring), computes s(R), s(M), s(A) at every residual node, keeps the contiguous span
    l_start..l_end around the seed where every link has s(R) >= t_res (nodes outside stay in the
    result with in_span=False), and adds the MLP/attention predecessors of every residual node
    whose score is >= t_module.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    for name, t in (("t_res", t_res), ("t_module", t_module)):
        if not (isinstance(t, (int, float)) and -1.0 <= t <= 1.0):
            raise ValueError(f"{name} must be a cosine threshold in [-1, 1], got {t!r}")
    seed = parse_feature(seed, bundle)
    start, notes = _residual_seed(bundle, seed)
    labels = labels or {}
    chain: dict[int, FeatureId] = {start.layer: start}
    edges: list[FlowEdge] = []
    if direction in ("both", "backward"):
        f = start
        while (p := predecessors(bundle, f).res) is not None:
            edges.append(FlowEdge(p[0], f, p[1]))
            chain[p[0].layer] = f = p[0]
    if direction in ("both", "forward"):
        f = start
        while (s := successor(bundle, f)) is not None:
            edges.append(FlowEdge(f, s[0], s[1]))
            chain[s[0].layer] = f = s[0]
    preds = {l: predecessors(bundle, f) for l, f in chain.items()}
    # Link strength into layer l = cosine of the chain edge ending at layer l.
    link = {e.target.layer: e.cosine for e in edges if e.target.site == "res"}
    l_start = l_end = start.layer
    while l_start - 1 in chain and link.get(l_start, -1.0) >= t_res:
        l_start -= 1
    while l_end + 1 in chain and link.get(l_end + 1, -1.0) >= t_res:
        l_end += 1
    nodes: list[FlowNode] = []
    for l in sorted(chain):
        f, p = chain[l], preds[l]
        in_span = l_start <= l <= l_end
        nodes.append(FlowNode(
            id=f, score=1.0 if f == start else link[l + 1] if l < start.layer else link[l],
            role="seed" if f == start else "residual", s_res=p.res[1] if p.res else None,
            s_mlp=p.mlp[1] if p.mlp else None, s_attn=p.attn[1] if p.attn else None,
            in_span=in_span, label=labels.get(str(f), "")))
        for site in ("mlp", "attn"):
            m = getattr(p, site)
            if m is not None and m[1] >= t_module:
                approx = bool(bundle.is_approx(site))
                nodes.append(FlowNode(id=m[0], score=m[1], role=site, in_span=in_span,
                                      label=labels.get(str(m[0]), ""), approx=approx))
                edges.append(FlowEdge(m[0], f, m[1]))
    if seed != start:
        nodes.append(FlowNode(id=seed, score=1.0, role="seed", label=labels.get(str(seed), ""),
                              approx=bool(bundle.is_approx(seed.site))))
        edges.append(FlowEdge(seed, start, float(bundle.decoder(*seed[:2])[seed.index] @
                                                 bundle.decoder(start.layer, "res")[start.index])))
        for n in nodes:
            if n.id == start:
                n.role = "residual"
    for site in ("mlp", "attn"):
        if bundle.is_approx(site) and any(n.site == site for n in nodes):
            notes.append(f"{site} matches use an approximation: {bundle.is_approx(site)}")
    return FlowGraph(seed, nodes, edges, l_start, l_end, t_res, t_module, "top1_cosine", notes)


# ---- CLI -----------------------------------------------------------------------------------

def _cmd_flow(args) -> dict:
    from .cli import load_bundle

    parse_feature(args.feature)  # fail on malformed ids before loading a model
    bundle = load_bundle(args)
    labels = {}
    try:
        from .catalog import Catalog

        labels = Catalog.load(bundle).labels()
    except (ImportError, FileNotFoundError) as e:
        log.info("no catalog labels: %s", e)
    graph = build_flow_graph(bundle, args.feature, args.t_res, args.t_module, args.direction, labels)
    return graph.to_json()


def register(sub, common) -> None:
    p = sub.add_parser("flow", parents=[common], help="flow graph of a feature (layer/site/index)")
    p.add_argument("feature", help="feature id layer/site/index, e.g. 12/res/40")
    p.add_argument("--t-res", type=float, default=0.5, help="cut where s(R) < this (default 0.5, App. B.2)")
    p.add_argument("--t-module", type=float, default=0.15, help="keep MLP/attn nodes with score >= this")
    p.add_argument("--direction", default="both", choices=DIRECTIONS)
    p.set_defaults(fn=_cmd_flow)
