"""Plotly figures: flow graph, steering schedule preview, judge scores, live activations."""

from __future__ import annotations

from typing import Callable

import plotly.graph_objects as go

from .features import FeatureId
from .graph import FlowEdge, FlowGraph, FlowNode

LANES = {"attn": 2, "res": 1, "mlp": 0}
LANE_NAMES = {2: "attention", 1: "residual", 0: "MLP"}
SITE_COLORS = {"res": "#4C6EF5", "mlp": "#F59F00", "attn": "#12B886"}
# the app's output columns, left to right: the scores chart shows its bars in the same order
VARIANT_ORDER = ("unsteered", "steered", "single", "cumulative", "prompted", "random")


def _link_pair(graph: FlowGraph, node) -> str:
    """The layer pair of the match a node's score measures (the link that gave it its score)."""
    for e in graph.edges:
        if node.id in (e.source, e.target) and abs(e.cosine - node.score) < 1e-6:
            other = e.target if e.source == node.id else e.source
            return f"{other.layer}/{other.site} → {node.layer}/{node.site}"
    return f"{node.layer}/{node.site}"


def index_labels(nodes: list[FlowNode], edges: "list[FlowEdge]" = ()) -> dict:
    """Which nodes carry their index as a text label: every node except one that continues the
    same index from the layer before - in the residual lane, through a match (an edge from
    ``layer-1/res/index``); in a module lane, where ``layer-1/site/index`` is a node too (module
    nodes have no edges between them, so a run of one index is written once). The seed is always
    labelled. A feature that keeps its index over 30 layers reads "402" once, not
    "402402402..."; two chains merged in one graph (a seed set) each keep their own labels; every
    node's full id is in its hover. -> {feature id: label text or ""}"""
    present = {n.id for n in nodes}
    linked = {(e.source, e.target) for e in edges}
    out = {}
    for n in nodes:
        prev = FeatureId(n.layer - 1, n.site, n.id.index)
        continues = (prev, n.id) in linked if n.site == "res" else prev in present
        out[n.id] = "" if continues and n.role != "seed" else str(n.id.index)
    return out


def label_positions(nodes: list[FlowNode], labels: dict, min_gap: int = 2) -> dict:
    """Where each node's index label goes: above the node, or below it when the label above would
    come within ``min_gap`` layers of the last one above in the same lane; a label that fits
    neither is left out (the node's hover still names it), except the seed's. Module lanes change
    index at every layer, so neighbouring 3-4 digit labels alternate instead of overlapping; wide
    graphs pass a larger ``min_gap`` (`flow_figure`). -> {feature id: "top center" | "bottom
    center" | None (no label)}"""
    out, last = {}, {}  # last: (site, slot) -> layer of the last label written there
    for n in sorted(nodes, key=lambda n: n.layer):
        if not labels.get(n.id):
            out[n.id] = "top center"
            continue
        where = None
        for slot in ("top center", "bottom center"):
            if n.layer - last.get((n.site, slot), -10**6) >= min_gap:
                where = slot
                break
        if where is None and n.role == "seed":
            where = "top center"
        if where is not None:
            last[(n.site, where)] = n.layer
        out[n.id] = where
    return out


def layer_step(span: int) -> int:
    """x tick spacing for a graph ``span`` layers wide: every layer up to 10, then every 2nd / 5th."""
    return 1 if span <= 10 else 2 if span <= 20 else 5


def flow_figure(graph: FlowGraph, live: dict | None = None, title: str | None = None,
                chance: dict[tuple[int, str], float] | None = None, d_model: int | None = None,
                label: Callable[[str], str] | None = None) -> go.Figure:
    """Layers on x, sites as lanes; node size and colour by score (or by the node's max live
    activation on a prompt when ``live`` is given); nodes outside l_start..l_end are faded;
    edges drawn with width proportional to the cosine. ``chance`` ({(layer, site): chance cosine of
    a match into that SAE}, `steering.flow.chance_levels`) is shown in each node's hover for the
    layer pair of its link and marked on the colour bar, so a reader sees what a score means.
    ``label(feature id) -> str`` names each node in its hover (the app passes the label of the
    view shown: whole words, or raw in the researcher view); without it, the graph's own labels.
    Indices are written on the nodes where they change along a lane (`index_labels`)."""
    pos = {n.id: (n.layer, LANES[n.site]) for n in graph.nodes}
    layers = [n.layer for n in graph.nodes]
    index_text = index_labels([n for n in graph.nodes if n.in_span], graph.edges)
    n_x = max(layers) - min(layers) + 1  # layers on the x axis
    # wide graphs: labels further apart, smaller nodes (the demo shows the plot at half the page)
    where = label_positions([n for n in graph.nodes if n.in_span], index_text,
                            min_gap=2 if n_x <= 12 else 3 if n_x <= 24 else 4)
    index_text = {k: v if where.get(k) else "" for k, v in index_text.items()}
    big = max(12.0, min(32.0, 600 / (n_x + 2)))  # px of a node with score 1
    pad = max(1.0, 0.06 * n_x)  # x room on each side (layers): the first node clear of the lane names
    fig = go.Figure()
    for e in graph.edges:
        if e.source not in pos or e.target not in pos:
            continue
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"width": 1 + 5 * max(0.0, e.cosine), "color": "rgba(120,120,140,0.45)"}))
    live_max = {k: max(v[1:] or [0.0]) for k, v in (live or {}).get("acts", {}).items()}
    levels = sorted({chance[(n.layer, n.site)] for n in graph.nodes if (n.layer, n.site) in (chance or {})})
    for in_span in (True, False):
        nodes = [n for n in graph.nodes if n.in_span == in_span]
        if not nodes:
            continue
        colour = [live_max.get(str(n.id), 0.0) if live else n.score for n in nodes]
        bar = {"title": "max act." if live else "cosine", "len": 0.6, "x": 1.0, "xpad": 24}
        if levels and not live:  # where chance lies on the cosine scale
            shown = f"{levels[0]:.2f}" if levels[-1] - levels[0] < 0.005 else f"{levels[0]:.2f}-{levels[-1]:.2f}"
            # no "0" tick: chance sits ~0.12 above it and the two texts would touch
            bar.update(title=f"cosine<br>(chance ≈ {shown})", tickvals=[levels[0], 0.5, 1.0],
                       ticktext=["chance", "0.5", "1"])
        hover = []
        for n in nodes:
            name = label(str(n.id)) if label is not None else n.label
            lines = [f"<b>{n.id}</b> ({n.role})", name or "(no label)", f"score (cosine): {n.score:.3f}"]
            if chance and (n.layer, n.site) in chance and n.role != "seed":
                lines.append(f"chance cosine for {_link_pair(graph, n)}: {chance[(n.layer, n.site)]:.2f} (best of as "
                             f"many random unit directions{f' in {d_model} dims' if d_model else ''})")
            if n.site == "res":
                fmt = [f"{name} {v:.2f}" for name, v in (("s(R)", n.s_res), ("s(M)", n.s_mlp), ("s(A)", n.s_attn))
                       if v is not None]
                lines.append(" · ".join(fmt))
            if live:
                lines.append(f"max activation on prompt: {live_max.get(str(n.id), 0.0):.2f}")
            if n.approx:
                lines.append("approximate match (hook_z SAE mapped through o_proj)")
            hover.append("<br>".join(lines))
        fig.add_trace(go.Scatter(
            x=[n.layer for n in nodes], y=[LANES[n.site] for n in nodes], mode="markers+text",
            text=[index_text.get(n.id, "") if in_span else "" for n in nodes],
            textposition=[where.get(n.id) or "top center" for n in nodes],
            textfont={"size": 10}, hovertext=hover, hoverinfo="text", cliponaxis=False,
            name="in span" if in_span else "outside span (cut)", opacity=1.0 if in_span else 0.3,
            marker={"size": [big * (0.35 + 0.65 * max(0.0, min(1.0, n.score))) for n in nodes], "color": colour,
                    "colorscale": "Viridis", "cmin": 0, "cmax": max(colour + [1.0]) if live else 1.0,
                    "line": {"width": [3 if n.role == "seed" else 1 for n in nodes], "color": "#222"},
                    "showscale": in_span, "colorbar": bar}))
    fig.add_vrect(x0=graph.l_start - 0.4, x1=graph.l_end + 0.4, fillcolor="#E7F5FF", opacity=0.5, line_width=0,
                  layer="below")
    fig.update_layout(
        title=title or f"Flow graph of {graph.seed} (kept span: layers {graph.l_start}-{graph.l_end})",
        # room on each side (pad): the biggest marker stays inside the axes, clear of the lane names and colour bar
        xaxis={"title": "layer", "tick0": 0, "dtick": layer_step(max(layers) - min(layers)),
               "range": [min(layers) - pad, max(layers) + pad]}, height=400,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        yaxis={"tickvals": list(LANE_NAMES), "ticktext": list(LANE_NAMES.values()), "range": [-0.7, 2.8]},
        legend={"orientation": "h", "y": -0.2}, plot_bgcolor="white")
    return fig


def schedule_figure(rows: list[dict], title: str | None = None) -> go.Figure:
    """Bars of s'(l) (or r for removal) per layer and site: the preview of a steering plan."""
    removal = any(r.get("mode") == "rescale" for r in rows)
    if title is None:
        title = "Rescale factor r per layer" if removal else "Steering strength s'(l) per layer"
        pcts = [r for r in rows if r.get("pct_of_residual") is not None]
        if pcts:  # what s means in the model's own units
            top = max(pcts, key=lambda r: r["pct_of_residual"])
            # on its own, smaller line: one line was cut at the right edge of a half-width column
            title += (f"<br><sup>largest push: {top['pct_of_residual']:.0f}% of the residual norm"
                      f" (layer {top['layer']})</sup>")
    fig = go.Figure()
    for site, colour in SITE_COLORS.items():
        sub = [r for r in rows if r["site"] == site]
        if sub:
            fig.add_trace(go.Bar(x=[r["layer"] for r in sub], y=[r["strength"] for r in sub], name=site,
                                 marker_color=colour, hovertext=[r["feature"] for r in sub]))
    fig.update_layout(title=title, barmode="group", height=260, xaxis={"title": "layer", "dtick": 1},
                      yaxis={"title": "r" if removal else "strength s'(l)"},
                      margin={"l": 50, "r": 10, "t": 60 if "<br>" in title else 40, "b": 40},
                      plot_bgcolor="white")
    return fig


def scores_figure(summary: dict[str, dict], titles: dict[str, str] | None = None) -> go.Figure:
    """Grouped bars per variant: mean theme (behavioral), readability (the paper's coherence) and
    metric, all in [0, 1].
    Variants are in the app's column order (VARIANT_ORDER: unsteered, steered, the other condition,
    then the controls; others after them), whatever order ``summary`` has; ``titles`` names them.
    The legend sits above the bars, clear of the variant names, and the value labels have room
    above a bar of 1.00."""
    names = sorted(summary, key=lambda n: VARIANT_ORDER.index(n) if n in VARIANT_ORDER else len(VARIANT_ORDER))
    labels = [(titles or {}).get(n, n) for n in names]
    fig = go.Figure()
    if not names:
        fig.add_annotation(text="no scores (no theme given, or the judge was unavailable)", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_xaxes(visible=False)
    for key, label, colour in (("behavioral", "theme", "#7048E8"), ("coherence", "readability", "#37B24D"),
                               ("metric", "metric", "#F76707")):
        values = [summary[n].get(key) for n in names]
        fig.add_trace(go.Bar(x=labels, y=values, name=label, marker_color=colour,
                             text=[f"{v:.2f}" if v is not None else "" for v in values], textposition="outside",
                             cliponaxis=False))
    # t = 80: the app's plot label covers the top ~40 px, where the legend sat hidden (walkthrough)
    fig.update_layout(barmode="group", height=330, yaxis={"range": [0, 1.15], "title": "score (0-1)"},
                      margin={"l": 50, "r": 10, "t": 80, "b": 60}, plot_bgcolor="white",
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"})
    return fig


def live_figure(live: dict, max_nodes: int = 30) -> go.Figure:
    """Heatmap: flow-graph nodes (rows) x prompt tokens (columns), activation as colour."""
    ids = list(live["acts"])[:max_nodes]
    z = [live["acts"][i] for i in ids]
    fig = go.Figure(go.Heatmap(z=z, x=[f"{j}:{t}" for j, t in enumerate(live["tokens"])], y=ids,
                               colorscale="Magma", colorbar={"title": "act."}))
    fig.update_layout(height=120 + 18 * len(ids), margin={"l": 90, "r": 10, "t": 20, "b": 60})
    return fig
