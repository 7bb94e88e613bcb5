"""FlowGraph: the data object a flow computation returns (paper §3.3, App. B.2).

Pure data, JSON round-trippable; the functions that build it live in `flow.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .features import FeatureId, parse_feature
from .settings import T_MODULE, T_RES


@dataclass
class FlowNode:
    """One feature in a flow graph.

    Fields:
        id: the feature (``layer/site/index``).
        score: for residual nodes, the cosine of the chain link toward the seed (1.0 for the
            seed); for MLP/attention nodes, the cosine to the residual node they feed (s(M) or
            s(A) of that node).
        s_res, s_mlp, s_attn: predecessor scores of residual nodes (paper §3.3);
            None for MLP/attention nodes and where a predecessor site has no SAE.
        role: ``seed``, ``residual`` (chain node), ``mlp`` or ``attn`` (module predecessors).
        in_span: True when the node lies in l_start..l_end (kept after the t(R) cut).
        label: catalog label where one exists.
        approx: True where the match used an approximate decoder (hook_z SAEs mapped through o_proj).
    """

    id: FeatureId
    score: float
    role: str
    s_res: float | None = None
    s_mlp: float | None = None
    s_attn: float | None = None
    in_span: bool = True
    label: str = ""
    approx: bool = False

    @property
    def layer(self) -> int:
        return self.id.layer

    @property
    def site(self) -> str:
        return self.id.site

    def to_json(self) -> dict:
        d = asdict(self)
        d["id"] = str(self.id)
        d.update(layer=self.id.layer, site=self.id.site, index=self.id.index)
        return d


@dataclass
class FlowEdge:
    """A match between two features: ``source`` (earlier) -> ``target`` (later), with cosine."""

    source: FeatureId
    target: FeatureId
    cosine: float

    def to_json(self) -> dict:
        return {"source": str(self.source), "target": str(self.target), "cosine": self.cosine}


@dataclass
class FlowGraph:
    """Flow graph of a seed feature.

    Fields:
        seed: the feature the graph was built from.
        nodes: every node (residual chain + kept MLP/attention predecessors).
        edges: matches between nodes, earlier -> later.
        l_start, l_end: the kept span of residual layers (cut where s(R) < t_res).
        t_res, t_module: the thresholds used (defaults 0.5 and 0.15, App. B.2).
        method: matching method (``top1_cosine`` by default).
        notes: caveats (e.g. approximate attention matching).
    """

    seed: FeatureId
    nodes: list[FlowNode]
    edges: list[FlowEdge]
    l_start: int
    l_end: int
    t_res: float = T_RES
    t_module: float = T_MODULE
    method: str = "top1_cosine"
    notes: list[str] = field(default_factory=list)

    def residual_chain(self, span_only: bool = True) -> list[FlowNode]:
        """Residual nodes ordered by layer (within l_start..l_end unless span_only=False)."""
        return sorted((n for n in self.nodes if n.site == "res" and (n.in_span or not span_only)),
                      key=lambda n: n.layer)

    def node(self, fid: FeatureId | str) -> FlowNode:
        fid = parse_feature(fid)
        for n in self.nodes:
            if n.id == fid:
                return n
        raise KeyError(f"feature {fid} is not a node of the flow graph of {self.seed}")

    def to_json(self) -> dict:
        return {
            "seed": str(self.seed), "l_start": self.l_start, "l_end": self.l_end,
            "t_res": self.t_res, "t_module": self.t_module, "method": self.method, "notes": self.notes,
            "nodes": [n.to_json() for n in self.nodes], "edges": [e.to_json() for e in self.edges],
        }

    @classmethod
    def from_json(cls, d: dict) -> "FlowGraph":
        keys = {f for f in FlowNode.__dataclass_fields__}
        nodes = [FlowNode(**{**{k: v for k, v in n.items() if k in keys}, "id": parse_feature(n["id"])})
                 for n in d["nodes"]]
        edges = [FlowEdge(parse_feature(e["source"]), parse_feature(e["target"]), e["cosine"]) for e in d["edges"]]
        return cls(parse_feature(d["seed"]), nodes, edges, d["l_start"], d["l_end"], d.get("t_res", T_RES),
                   d.get("t_module", T_MODULE), d.get("method", "top1_cosine"), list(d.get("notes", [])))


def merge_graphs(graphs: list[FlowGraph]) -> FlowGraph:
    """One graph for showing a seed set's flow graphs together: every node once (a node in two
    graphs keeps its in-span version and the higher score), every edge once, the span from the
    earliest l_start to the latest l_end, the first graph's seed (the others keep role ``seed``).
    A single graph is returned as it is."""
    if len(graphs) == 1:
        return graphs[0]
    nodes: dict[FeatureId, FlowNode] = {}
    for g in graphs:
        for n in g.nodes:
            old = nodes.get(n.id)
            if old is None or (n.in_span, n.role == "seed", n.score) > (old.in_span, old.role == "seed", old.score):
                nodes[n.id] = n
    edges = list({(e.source, e.target): e for g in graphs for e in g.edges}.values())
    first = graphs[0]
    notes = [f"seed set: the flow graphs of {', '.join(str(g.seed) for g in graphs)} merged"]
    return FlowGraph(first.seed, list(nodes.values()), edges, min(g.l_start for g in graphs),
                     max(g.l_end for g in graphs), first.t_res, first.t_module, first.method,
                     notes + [x for g in graphs for x in g.notes])
