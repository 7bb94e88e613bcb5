"""Plotly figures on hand-built flow graphs and plans (pure, no model)."""

from steering.features import FeatureId
from steering.graph import FlowEdge, FlowGraph, FlowNode
from steering.plots import (LANES, flow_figure, index_labels, label_positions, live_figure, schedule_figure,
                            scores_figure)


def _graph() -> FlowGraph:
    r = [FeatureId(l, "res", 10 + l) for l in range(4)]
    m = FeatureId(2, "mlp", 7)
    nodes = [FlowNode(r[0], 0.3, "residual", in_span=False, label="early"),
             FlowNode(r[1], 0.8, "residual", label="mid"),
             FlowNode(r[2], 1.0, "seed", s_res=0.8, s_mlp=0.6, label="wedding"),
             FlowNode(r[3], 0.7, "residual", label="late"),
             FlowNode(m, 0.6, "mlp", label="cake")]
    edges = [FlowEdge(r[0], r[1], 0.3), FlowEdge(r[1], r[2], 0.8), FlowEdge(r[2], r[3], 0.7), FlowEdge(m, r[2], 0.6)]
    return FlowGraph(r[2], nodes, edges, l_start=1, l_end=3)


def test_flow_figure_places_fades_and_describes_nodes():
    fig = flow_figure(_graph())
    edges = [t for t in fig.data if t.mode == "lines"]
    assert len(edges) == 4
    assert max(t.line.width for t in edges) == edges[1].line.width  # the 0.8 link is drawn thickest
    inside, outside = [t for t in fig.data if t.mode == "markers+text"]
    assert list(inside.x) == [1, 2, 3, 2] and list(inside.y) == [LANES["res"]] * 3 + [LANES["mlp"]]
    assert list(outside.x) == [0] and outside.opacity < inside.opacity  # cut from the span: faded
    seed_hover = inside.hovertext[1]
    assert "2/res/12" in seed_hover and "wedding" in seed_hover and "1.000" in seed_hover and "s(M) 0.60" in seed_hover
    assert inside.marker.size[1] > inside.marker.size[0]  # bigger = closer match


def test_flow_figure_colours_by_live_activation():
    live = {"tokens": ["<s>", " the", " bride"],
            "acts": {"1/res/11": [9.0, 0.0, 1.0], "2/res/12": [5.0, 2.0, 3.0], "3/res/13": [0, 0, 0],
                     "2/mlp/7": [0, 0.5, 0]}}
    inside = [t for t in flow_figure(_graph(), live).data if t.mode == "markers+text"][0]
    assert list(inside.marker.color) == [1.0, 3.0, 0.0, 0.5]  # max over tokens, position 0 (sink) skipped
    heat = live_figure(live)
    assert list(heat.data[0].y) == list(live["acts"]) and len(heat.data[0].x) == 3


def test_schedule_and_scores_figures():
    rows = [{"layer": 1, "site": "res", "feature": "1/res/11", "strength": 3.0, "mode": "add"},
            {"layer": 2, "site": "res", "feature": "2/res/12", "strength": 2.2, "mode": "add"},
            {"layer": 2, "site": "mlp", "feature": "2/mlp/7", "strength": 2.2, "mode": "add"}]
    fig = schedule_figure(rows)
    assert {t.name: list(t.y) for t in fig.data} == {"res": [3.0, 2.2], "mlp": [2.2]}
    assert "r per layer" in schedule_figure([{**r, "mode": "rescale"} for r in rows]).layout.title.text
    # the push in the model's units goes on its own line with room above the plot (it was cut off)
    pushed = schedule_figure([{**r, "pct_of_residual": 10.0 * r["layer"]} for r in rows])
    first, second = pushed.layout.title.text.split("<br>")
    assert first == "Steering strength s'(l) per layer" and "20% of the residual norm (layer 2)" in second
    assert pushed.layout.margin.t > fig.layout.margin.t
    s = scores_figure({"unsteered": {"behavioral": 0.1, "coherence": 0.9, "metric": 0.09},
                       "steered": {"behavioral": 0.7, "coherence": 0.8, "metric": 0.56}}, {"steered": "Steered"})
    theme = next(t for t in s.data if t.name == "theme")
    assert list(theme.x) == ["unsteered", "Steered"] and list(theme.y) == [0.1, 0.7]


def test_flow_figure_shows_the_chance_cosine_of_each_layer_pair():
    """Issue 17: each node's hover names the layer pair of its link and that pair's chance cosine;
    the colour bar marks where chance lies (here two widths: two levels)."""
    chance = {(l, "res"): 0.12 for l in range(4)} | {(2, "mlp"): 0.19}
    inside = [t for t in flow_figure(_graph(), chance=chance, d_model=64).data if t.mode == "markers+text"][0]
    hover = dict(zip([int(x) for x in inside.x], inside.hovertext))  # the in-span res nodes by layer (last: mlp)
    assert "chance cosine for 2/res → 3/res: 0.12" in hover[3] and "in 64 dims" in hover[3]
    assert "chance cosine for 1/res → 2/res" not in inside.hovertext[1]  # the seed: no link of its own
    assert "chance cosine for 2/res → 2/mlp: 0.19" in inside.hovertext[3]
    bar = inside.marker.colorbar
    assert "chance ≈ 0.12-0.19" in bar.title.text and 0.12 in bar.tickvals and "chance" in bar.ticktext
    assert 0.0 not in bar.tickvals  # a "0" tick would touch the chance text just above it
    live = [t for t in flow_figure(_graph(), {"tokens": ["a"], "acts": {}}, chance=chance).data
            if t.mode == "markers+text"][0]
    assert "chance" not in live.marker.colorbar.title.text  # coloured by activation: no cosine scale


def _long_graph() -> FlowGraph:
    """A feature that keeps its index 402 over 30 layers (the shipped SAEs' norm), one index change
    at layer 10, an MLP node, the seed at layer 27."""
    ids = [FeatureId(l, "res", 402 if l != 10 else 7) for l in range(30)]
    nodes = [FlowNode(f, 1.0 if f.layer == 27 else 0.9, "seed" if f.layer == 27 else "residual", label=f"raw {f}")
             for f in ids] + [FlowNode(FeatureId(27, "mlp", 5), 0.5, "mlp", label="raw mlp")]
    edges = [FlowEdge(a, b, 0.9) for a, b in zip(ids, ids[1:])]
    return FlowGraph(ids[27], nodes, edges, l_start=0, l_end=29)


def test_flow_figure_stays_readable_on_a_30_layer_graph():
    """Walkthrough: the last layer's node was clipped at the plot edge and touched the colour bar,
    index labels ran together ("402402402") and the x ticks were crowded."""
    fig = flow_figure(_long_graph())
    inside = [t for t in fig.data if t.mode == "markers+text"][0]
    lo, hi = fig.layout.xaxis.range
    assert lo <= -1.0 and hi >= 30.0  # a full layer of room on each side of layers 0..29
    assert inside.cliponaxis is False  # big markers and their labels are never cut at the plot edge
    labelled = {(int(x), y): t for x, y, t in zip(inside.x, inside.y, inside.text) if t}
    res = LANES["res"]
    # the first node of each run of one index, and the seed; every other res node unlabelled
    assert labelled == {(0, res): "402", (10, res): "7", (11, res): "402", (27, res): "402", (27, LANES["mlp"]): "5"}
    hover = dict(zip([(int(x), y) for x, y in zip(inside.x, inside.y)], inside.hovertext))
    assert "<b>20/res/402</b>" in hover[(20, res)]  # unlabelled on the plot, full id on hover
    assert fig.layout.xaxis.dtick >= 5  # 30 layers: a tick every 5th, not every layer


def test_flow_figure_hover_uses_the_label_of_the_view():
    """The lay view shows readable labels in the hover, not the graph's raw ones."""
    inside = [t for t in flow_figure(_long_graph(), label=lambda fid: f"plain {fid}").data
              if t.mode == "markers+text"][0]
    assert all("plain " in h and "raw " not in h for h in inside.hovertext)
    raw = [t for t in flow_figure(_long_graph()).data if t.mode == "markers+text"][0]
    assert "raw 0/res/402" in raw.hovertext[0]


def test_scores_figure_follows_the_column_order_and_keeps_labels_clear():
    """Walkthrough: bars came in the run's order (random before asking), not the columns'; the
    legend covered the variant names and "1.00" labels were cut at the top."""
    summary = {v: {"behavioral": 1.0, "coherence": 1.0, "metric": 1.0} for v in ("random", "steered", "prompted",
                                                                                   "unsteered")}
    fig = scores_figure(summary, {"unsteered": "Unsteered", "steered": "Steered", "prompted": "Ask",
                                  "random": "Random"})
    assert list(fig.data[0].x) == ["Unsteered", "Steered", "Ask", "Random"]
    assert fig.layout.legend.y >= 1 and fig.layout.legend.yanchor == "bottom"  # above the bars, not on the names
    assert all(t.cliponaxis is False for t in fig.data) and fig.layout.yaxis.range[1] > 1.1


def test_index_labels_follow_matches_not_the_sorted_lane():
    """Two chains merged in one graph (a seed set) interleave in the residual lane: each keeps its
    own index written once; an index that repeats without a match (no edge) is written again, and a
    module lane writes a run of one index once."""
    a = [FeatureId(l, "res", 402) for l in range(4)]
    b = [FeatureId(l, "res", 9) for l in range(1, 4)]
    orphan = FeatureId(5, "res", 402)  # same index two layers on, no edge into it
    mods = [FeatureId(l, "mlp", 5) for l in (1, 2)] + [FeatureId(3, "mlp", 6)]
    nodes = ([FlowNode(f, 0.9, "seed" if f == a[2] else "residual") for f in a + b + [orphan]]
             + [FlowNode(f, 0.4, "mlp") for f in mods])
    edges = [FlowEdge(x, y, 0.9) for chain in (a, b) for x, y in zip(chain, chain[1:])]
    text = {str(k): v for k, v in index_labels(nodes, edges).items() if v}
    assert text == {"0/res/402": "402", "2/res/402": "402", "1/res/9": "9", "5/res/402": "402",
                    "1/mlp/5": "5", "3/mlp/6": "6"}


def test_neighbouring_module_labels_alternate_above_and_below():
    """A module lane changes index at every layer: labels of neighbouring layers alternate above and
    below their nodes instead of overlapping; a lone label and the residual chain's stay above."""
    mlp = [FeatureId(l, "mlp", 700 + l) for l in range(23, 27)] + [FeatureId(28, "mlp", 5)]
    res = [FeatureId(l, "res", 402) for l in range(23, 27)]
    nodes = [FlowNode(f, 0.4, "mlp") for f in mlp] + [FlowNode(f, 0.9, "residual") for f in res]
    labels = index_labels(nodes, [FlowEdge(x, y, 0.9) for x, y in zip(res, res[1:])])
    where = {str(k): v for k, v in label_positions(nodes, labels).items()}
    assert [where[f"{l}/mlp/{700 + l}"] for l in range(23, 27)] == ["top center", "bottom center"] * 2
    assert where["28/mlp/5"] == "top center"
    assert {where[str(f)] for f in res} == {"top center"}  # one label, then unlabelled continuations
    fig = flow_figure(FlowGraph(res[0], nodes, [], l_start=23, l_end=28))
    inside = [t for t in fig.data if t.mode == "markers+text"][0]
    assert "bottom center" in list(inside.textposition)


def test_wide_graphs_thin_module_labels_and_shrink_nodes():
    """A 30-layer graph at half a page: labels in one lane and slot stay >= 4 layers apart (the
    others are left to the hover), the seed keeps its label, and nodes are smaller than in a
    short graph."""
    mlp = [FeatureId(l, "mlp", 300 + l) for l in range(30)]
    res = [FeatureId(l, "res", 7) for l in range(30)]
    nodes = [FlowNode(f, 0.5, "mlp") for f in mlp] + [FlowNode(f, 1.0, "seed" if f.layer == 12 else "residual")
                                                      for f in res]
    graph = FlowGraph(res[12], nodes, [FlowEdge(x, y, 0.9) for x, y in zip(res, res[1:])], l_start=0, l_end=29)
    inside = [t for t in flow_figure(graph).data if t.mode == "markers+text"][0]
    shown = {(x, y): (t, p) for x, y, t, p in zip(inside.x, inside.y, inside.text, inside.textposition) if t}
    for slot in ("top center", "bottom center"):
        xs = sorted(x for (x, y), (_, p) in shown.items() if y == LANES["mlp"] and p == slot)
        assert xs and all(b - a >= 4 for a, b in zip(xs, xs[1:]))
    assert shown[(12, LANES["res"])][0] == "7"  # the seed
    short = FlowGraph(res[12], [n for n in nodes if 10 <= n.id.layer <= 14], [], l_start=10, l_end=14)
    small = [t for t in flow_figure(short).data if t.mode == "markers+text"][0]
    assert max(inside.marker.size) < max(small.marker.size)
