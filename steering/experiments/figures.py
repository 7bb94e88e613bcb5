"""Plotly figures of the experiments (saved as HTML by `common.save_figure`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

GROUP_COLORS = {"RES": "#4C6EF5", "MLP": "#F59F00", "ATT": "#12B886", "RES+MLP": "#91A7FF",
                "RES+ATT": "#63E6BE", "MLP+ATT": "#FFD43B", "RES+MLP+ATT": "#ADB5BD", "From nowhere": "#E03131"}
CONDITION_COLORS = {"baseline": "#868E96", "single": "#4C6EF5", "constant": "#F59F00", "exp": "#E03131",
                    "linear": "#12B886", "cumulative": "#E03131", "unsteered": "#000000"}


def shares_figure(shares: dict[str, dict[str, float]], title: str) -> go.Figure:
    """Stacked bars: share of each predecessor group per layer (paper §5.1, Fig. 4 style)."""
    layers = sorted(shares, key=int)
    fig = go.Figure()
    for g, colour in GROUP_COLORS.items():
        fig.add_bar(x=[int(l) for l in layers], y=[shares[l][g] for l in layers], name=g, marker_color=colour)
    fig.update_layout(barmode="stack", title=f"Predecessor groups per layer ({title})", xaxis_title="layer",
                      yaxis_title="share of active features", yaxis_range=[0, 1], template="plotly_white")
    return fig


def score_figure(scores: dict[str, dict[str, dict]], bins) -> go.Figure:
    """Per score s(R), s(M), s(A): the normalised histogram of each group (paper App. A.1)."""
    names = ("s(R)", "s(M)", "s(A)")
    fig = make_subplots(rows=1, cols=3, subplot_titles=names, shared_yaxes=True)
    centres = [(a + b) / 2 for a, b in zip(bins[:-1], bins[1:])]
    for col, s in enumerate(names, start=1):
        for g, colour in GROUP_COLORS.items():
            hist = scores[g][s]["hist"]
            total = sum(hist)
            if not total:
                continue
            fig.add_scatter(x=centres, y=[h / total for h in hist], mode="lines", name=g, legendgroup=g,
                            showlegend=col == 1, line={"color": colour}, row=1, col=col)
        fig.update_xaxes(title_text="max cosine to predecessor site", row=1, col=col)
    fig.update_layout(title="Predecessor scores by group", yaxis_title="share of cases", template="plotly_white")
    return fig


def deactivation_r_figure(by_r: dict[str, dict], methods: list[str]) -> go.Figure:
    """Activation change and success rate vs r per method (paper Fig. 7 style)."""
    rs = sorted(by_r, key=float, reverse=True)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean activation change", "success rate"))
    for m in methods:
        for col, key in ((1, "activation_change"), (2, "success_rate")):
            fig.add_scatter(x=[float(r) for r in rs], y=[by_r[r]["summary"][m][key] for r in rs], mode="lines+markers",
                            name=m, legendgroup=m, showlegend=col == 1, row=1, col=col)
    fig.update_xaxes(title_text="rescale factor r", autorange="reversed")
    fig.update_layout(title="Deactivation vs r (single-predecessor groups)", template="plotly_white")
    return fig


def table_figure(summary: dict[str, dict], groups: dict[str, dict[str, dict]]) -> go.Figure:
    """Table 1 style bars: activation change and success rate per method, overall and per group."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean activation change", "success rate"))
    cols = ["all", *groups]
    for m in summary:
        for col, key in ((1, "activation_change"), (2, "success_rate")):
            ys = [summary[m][key]] + [groups[g].get(m, {}).get(key) for g in groups]
            fig.add_bar(x=cols, y=ys, name=m, legendgroup=m, showlegend=col == 1, row=1, col=col)
    fig.update_layout(barmode="group", title="Deactivation by method (r = 0)", template="plotly_white")
    return fig


def curve_figure(rows: list[dict], x: str, facet: str, title: str, y: str = "metric") -> go.Figure:
    """Lines of mean ``y`` vs ``x`` per condition, one panel per value of ``facet``."""
    facets = sorted({r[facet] for r in rows}, key=lambda v: (isinstance(v, str), v))
    fig = make_subplots(rows=1, cols=len(facets), subplot_titles=[f"{facet} = {v}" for v in facets],
                        shared_yaxes=True)
    for col, fv in enumerate(facets, start=1):
        for cond, colour in CONDITION_COLORS.items():
            pts = sorted((r[x], r[y]) for r in rows if r[facet] == fv and r["condition"] == cond and r[y] is not None)
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=cond,
                                legendgroup=cond, showlegend=col == 1, line={"color": colour}, row=1, col=col)
        fig.update_xaxes(title_text=x, row=1, col=col)
    fig.update_layout(title=title, yaxis_title=y, template="plotly_white")
    return fig


def best_bars(best: dict[str, dict[str, dict]], title: str) -> go.Figure:
    """Best configuration's metric per theme and condition."""
    fig = go.Figure()
    conds = [c for c in CONDITION_COLORS if any(c in v for v in best.values())]
    for cond in conds:
        fig.add_bar(x=list(best), y=[best[t].get(cond, {}).get("metric") for t in best], name=cond,
                    marker_color=CONDITION_COLORS[cond],
                    hovertext=[str(best[t].get(cond, {}).get("config", "")) for t in best])
    fig.update_layout(barmode="group", title=title, yaxis_title="best mean metric", template="plotly_white")
    return fig


def pareto_figure(points: list[dict], title: str) -> go.Figure:
    """Behavioral vs coherence of every configuration (mean over themes and samples), by condition,
    with each condition's Pareto front as a line."""
    fig = go.Figure()
    for cond, colour in CONDITION_COLORS.items():
        pts = [p for p in points if p["condition"] == cond]
        if not pts:
            continue
        fig.add_scatter(x=[p["behavioral"] for p in pts], y=[p["coherence"] for p in pts], mode="markers", name=cond,
                        legendgroup=cond, marker={"color": colour, "opacity": 0.6},
                        hovertext=[p["config"] for p in pts])
        front = pareto_front([(p["behavioral"], p["coherence"]) for p in pts])
        fig.add_scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", legendgroup=cond,
                        showlegend=False, line={"color": colour})
    fig.update_layout(title=title, xaxis_title="behavioral (theme) score, 0-1", yaxis_title="coherence, 0-1",
                      template="plotly_white")
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x, y), sorted by x (higher is better in both)."""
    front, best_y = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)
