"""Steering (steering/steer.py): exactness of the hooks, removal, schedules, conditions, isolation."""

import math

import pytest
import torch

from steering.features import FeatureId
from steering.graph import FlowEdge, FlowGraph, FlowNode
from steering.sites import capture_sites, count_hooks
from steering.steer import SteerSpec, plan, schedule_strength, schedule_table, steering

KEYS = [(l, s) for l in range(3) for s in ("res", "mlp", "attn")]


def _capture(bundle, ids, rows=None, mask=None):
    store = {}
    mods = {k: bundle.module(*k) for k in KEYS}
    if rows is None:
        with capture_sites(mods, store):
            bundle.model(input_ids=ids, attention_mask=mask)
    else:
        with steering(bundle, rows, mask), capture_sites(mods, store):
            bundle.model(input_ids=ids, attention_mask=mask)
    return store


def _expected_delta(b, specs):
    """Reference: the scheduled s_l * c_f * d_f summed per site, built from the bundle's tensors."""
    out = {}
    for s in specs:
        f = s.feature
        c = float(b.ref_scale(f.layer, f.site)[f.index]) if s.units == "folded" else 1.0
        out[(f.layer, f.site)] = out.get((f.layer, f.site), 0) + s.strength * c * b.decoder(f.layer, f.site)[f.index]
    return out


def test_added_direction_is_exact_and_only_where_scheduled(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["The angry man shouted"])["input_ids"]
    f = FeatureId(1, "mlp", 5)
    clean = _capture(b, ids)
    steered = _capture(b, ids, [[SteerSpec(f, 2.5)]])
    delta = 2.5 * b.ref_scale(1, "mlp")[5] * b.decoder(1, "mlp")[5]
    # every position but the attention sink (position 0) gets exactly the scheduled direction
    torch.testing.assert_close(steered[(1, "mlp")][:, 1:], clean[(1, "mlp")][:, 1:] + delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[(1, "mlp")][:, 0], clean[(1, "mlp")][:, 0])
    torch.testing.assert_close(steered[(1, "res")][:, 1:], clean[(1, "res")][:, 1:] + delta, rtol=1e-4, atol=1e-4)
    for k in [(0, "res"), (0, "mlp"), (0, "attn"), (1, "attn")]:
        torch.testing.assert_close(steered[k], clean[k])
    assert not torch.allclose(steered[(2, "res")], clean[(2, "res")])  # it does propagate
    assert count_hooks(b.model) == 0


def _tiny_graph():
    """Hand-built flow graph on the tiny bundle: a residual chain 0..2 plus module nodes."""
    r = [FeatureId(0, "res", 11), FeatureId(1, "res", 22), FeatureId(2, "res", 33)]
    nodes = [FlowNode(r[0], 0.9, "residual"), FlowNode(r[1], 1.0, "seed"), FlowNode(r[2], 0.8, "residual"),
             FlowNode(FeatureId(0, "attn", 4), 0.3, "attn"), FlowNode(FeatureId(1, "mlp", 9), 0.4, "mlp"),
             FlowNode(FeatureId(1, "attn", 17), 0.2, "attn"), FlowNode(FeatureId(2, "mlp", 40), 0.5, "mlp")]
    return FlowGraph(r[1], nodes, [FlowEdge(r[0], r[1], 0.9), FlowEdge(r[1], r[2], 0.8)], 0, 2)


@pytest.mark.parametrize("schedule", ["exp", "linear", "constant"])
def test_scheduled_plan_is_exact_at_every_site_and_nowhere_else(tiny_bundle, schedule):
    """Each site's output after the hook == its own output before the hook + the scheduled
    s_l * c_f * d_f, on every token; unscheduled sites and the unsteered row 0 are untouched."""
    b = tiny_bundle
    specs = plan(_tiny_graph(), "cumulative", layer=1, strength=3.0, schedule=schedule, alpha=-0.25, s_end=1.0)
    assert {(s.feature.layer, s.feature.site) for s in specs} == {(0, "res"), (0, "attn"), (1, "res"),
                                                                   (1, "mlp"), (1, "attn")}
    expected = _expected_delta(b, specs)
    ids = b.tokenize(["The angry man shouted", "Once upon a time there"])["input_ids"]
    mods = {k: b.module(*k) for k in KEYS}
    before, after = {}, {}
    # hooks run in registration order: `before` sees the raw module output, `after` the edited one
    with capture_sites(mods, before), steering(b, [[], specs]), capture_sites(mods, after):
        b.model(input_ids=ids)
    clean = _capture(b, ids)
    for k in KEYS:
        torch.testing.assert_close(after[k][0], before[k][0])  # row 0: unsteered
        want = expected.get(k, torch.zeros(b.d_model))
        diff = after[k][1] - before[k][1]
        torch.testing.assert_close(diff[1:], want.expand_as(diff[1:]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(diff[0], torch.zeros(b.d_model))  # the attention sink is never edited
    for k in [(0, "mlp"), (0, "attn"), (0, "res")]:  # row 0 equals a clean forward
        torch.testing.assert_close(before[k][0], clean[k][0])
    assert count_hooks(b.model) == 0


def test_raw_units_skip_the_reference_scale(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["Once upon a time"])["input_ids"]
    clean = _capture(b, ids)
    steered = _capture(b, ids, [[SteerSpec(FeatureId(0, "res", 3), 4.0, units="raw")]])
    torch.testing.assert_close(steered[(0, "res")][:, 1:], clean[(0, "res")][:, 1:] + 4.0 * b.decoder(0, "res")[3])


def _active_feature(b, ids, layer=1, site="res"):
    z = b.encode(layer, site, _capture(b, ids)[(layer, site)])  # [batch, seq, d_sae]
    return int(z[:, 1:].sum((0, 1)).argmax())


def test_rescale_zero_removes_the_feature_but_not_at_position_0(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["The recipe needs flour sugar eggs and butter"])["input_ids"]
    clean = _capture(b, ids)
    z = b.encode(1, "res", clean[(1, "res")])[0]  # [seq, d_sae]
    f = _active_feature(b, ids)
    assert z[1:, f].max() > 0
    steered = _capture(b, ids, [[SteerSpec(FeatureId(1, "res", f), 0.0, mode="rescale")]])
    z2 = b.encode(1, "res", steered[(1, "res")])[0]
    assert float(z2[1:, f].abs().max()) < 1e-3 * float(z[1:, f].max()) + 1e-4
    torch.testing.assert_close(steered[(1, "res")][0, 0], clean[(1, "res")][0, 0])  # sink untouched
    # r = -2: the feature's share of h becomes -2 a_t W_dec[f] (h + (r - 1) a_t W_dec[f]), exactly
    neg = _capture(b, ids, [[SteerSpec(FeatureId(1, "res", f), -2.0, mode="rescale")]])
    change = -3.0 * z[:, f, None] * b.sae(1, "res").W_dec[f].detach()  # [seq, d_model]
    change[0] = 0.0
    torch.testing.assert_close(neg[(1, "res")][0], clean[(1, "res")][0] + change, rtol=1e-4, atol=1e-4)


def test_rescale_positions_follow_the_kv_cache_and_left_padding(tiny_bundle):
    """Token-by-token decoding with a KV cache (every call sees one token, the first call is
    position 0) gives the same edited states as one full forward: nothing indexes positions
    within a call; under left padding each row's first real token is the one skipped."""
    b = tiny_bundle
    ids = b.tokenize(["The recipe needs flour sugar eggs"])["input_ids"]  # [1, seq]
    pad = b.tokenizer.pad_token_id
    ids2 = torch.cat([ids, torch.cat([torch.full((1, 3), pad), ids[:, :-3]], 1)])  # [2, seq], row 1 left-padded
    mask = torch.ones_like(ids2)
    mask[1, :3] = 0
    clean = _capture(b, ids2, mask=mask)[(1, "res")]  # [2, seq, d_model]
    z_clean = b.encode(1, "res", clean)  # [2, seq, d_sae]
    f = int(z_clean[1, 4:].sum(0).argmax())
    assert z_clean[1, 4:, f].max() > 0 and z_clean[0, 1:, f].max() > 0
    rows = [[SteerSpec(FeatureId(1, "res", f), 0.0, mode="rescale")]]
    full = _capture(b, ids, rows)[(1, "res")]  # [1, seq, d_model]
    steps, cache = [], None
    with steering(b, rows):
        for t in range(ids.shape[1]):
            store = {}
            with capture_sites({0: b.module(1, "res")}, store):
                out = b.model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(store[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full[0, 0], clean[0, 0])  # the first call's only token is the sink
    assert count_hooks(b.model) == 0
    padded = _capture(b, ids2, rows * 2, mask)[(1, "res")]
    torch.testing.assert_close(padded[1, 3], clean[1, 3])  # row 1's first real token: untouched
    torch.testing.assert_close(padded[0, 0], clean[0, 0])
    z = b.encode(1, "res", padded)[..., f]  # [2, seq]
    assert float(z[1, 4:].abs().max()) < 1e-3 and float(z[0, 1:].abs().max()) < 1e-3


def test_steering_context_removes_hooks_after_errors(tiny_bundle):
    specs = [[SteerSpec(FeatureId(1, "res", 3), 1.0), SteerSpec(FeatureId(0, "mlp", 3), 0.0, mode="rescale")]]
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny_bundle, specs):
            assert count_hooks(tiny_bundle.model) == 3  # two sites + the cache-length pre-hook
            raise RuntimeError("boom")
    assert count_hooks(tiny_bundle.model) == 0
    with pytest.raises(ValueError, match="no SAE loaded|out of range"):  # fails while building, before hooks
        with steering(tiny_bundle, [[SteerSpec(FeatureId(7, "res", 3), 1.0)]]):
            pass
    assert count_hooks(tiny_bundle.model) == 0


def test_schedules_match_hand_computed_values():
    assert schedule_strength(12, "exp", 3.0, alpha=-0.25) == pytest.approx(3 * math.exp(-3))  # 0.149361
    assert schedule_strength(0, "exp", 8.0, alpha=-0.05) == pytest.approx(8.0)
    assert schedule_strength(20, "exp", 8.0, alpha=-0.05) == pytest.approx(2.943036, abs=1e-6)
    assert schedule_strength(4, "linear", 8.0, l_start=2, l_end=6, s_end=1.0) == pytest.approx(4.5)
    assert schedule_strength(6, "linear", 8.0, l_start=2, l_end=6, s_end=1.0) == pytest.approx(1.0)
    assert schedule_strength(2, "linear", 8.0, l_start=2, l_end=6, s_end=1.0) == pytest.approx(8.0)
    assert schedule_strength(9, "constant", 2.0) == 2.0
    with pytest.raises(ValueError, match="valid: exp, linear, constant"):
        schedule_strength(1, "cosine", 1.0)


def _graph():
    r = [FeatureId(l, "res", l + 1) for l in range(3)]
    nodes = [FlowNode(r[0], 0.9, "residual"), FlowNode(r[1], 1.0, "seed"), FlowNode(r[2], 0.8, "residual"),
             FlowNode(FeatureId(1, "mlp", 7), 0.4, "mlp"), FlowNode(FeatureId(2, "attn", 2), 0.3, "attn"),
             FlowNode(FeatureId(0, "attn", 1), 0.2, "attn", in_span=False)]
    return FlowGraph(r[1], nodes, [FlowEdge(r[0], r[1], 0.9), FlowEdge(r[1], r[2], 0.8)], 0, 2)


def test_conditions_and_include_exclude():
    g = _graph()
    base = plan(g, "seed-only", strength=5.0)
    assert plan(g, "baseline", strength=5.0) == base  # the old name, deprecated for a release
    assert [str(s.feature) for s in base] == ["1/res/2"] and base[0].strength == 5.0
    single = plan(g, "single", layer=1, strength=5.0)
    assert sorted(str(s.feature) for s in single) == ["1/mlp/7", "1/res/2"]
    assert all(s.strength == 5.0 for s in single)
    cum = plan(g, "cumulative", layer=2, strength=3.0, schedule="exp", alpha=-0.25)
    assert {str(s.feature) for s in cum} == {"0/res/1", "1/res/2", "2/res/3", "1/mlp/7", "2/attn/2"}
    for s in cum:
        assert s.strength == pytest.approx(3.0 * math.exp(-0.25 * s.feature.layer))
    cum1 = plan(g, "cumulative", layer=1, strength=3.0, schedule="constant")
    assert {str(s.feature) for s in cum1} == {"0/res/1", "1/res/2", "1/mlp/7"}
    lin = plan(g, "cumulative", layer=2, strength=8.0, schedule="linear", s_end=2.0)
    table = {t["feature"]: t["strength"] for t in schedule_table(lin)}
    assert table == pytest.approx({"0/res/1": 8.0, "1/res/2": 5.0, "1/mlp/7": 5.0, "2/res/3": 2.0, "2/attn/2": 2.0})
    cum2 = plan(g, "cumulative", layer=2, exclude=["1/mlp/7"], include=["0/attn/1"], sites=("res",))
    assert {str(s.feature) for s in cum2} == {"0/res/1", "1/res/2", "2/res/3", "0/attn/1"}
    rem = plan(g, "cumulative", layer=1, strength=-2.0, mode="rescale")
    assert all(s.mode == "rescale" and s.strength == -2.0 for s in rem)
    with pytest.raises(ValueError, match="valid: 0..2"):
        plan(g, "single", layer=5)
    with pytest.raises(ValueError, match="not a node"):
        plan(g, "single", include=["2/res/0"])
    with pytest.raises(ValueError, match="no feature left"):
        plan(g, "seed-only", exclude=["1/res/2"])
    with pytest.raises(ValueError, match="strength must be finite"):
        plan(g, "single", strength=float("nan"))
    with pytest.raises(ValueError, match="r = -100 is out of range; allowed: -64..64"):
        plan(g, "single", strength=-100.0, mode="rescale")
    with pytest.raises(ValueError, match="alpha = 9 is out of range"):
        plan(g, "cumulative", alpha=9.0)
    with pytest.raises(ValueError, match="valid: seed-only, single, cumulative"):
        plan(g, "everything")
    with pytest.raises(ValueError, match="unknown site"):
        plan(g, "single", sites=("resid",))


def test_schedule_table_shows_both_units(tiny_bundle):
    specs = [SteerSpec(FeatureId(1, "res", 3), 2.0), SteerSpec(FeatureId(0, "mlp", 5), 4.0, units="raw"),
             SteerSpec(FeatureId(0, "res", 1), -4.0, mode="rescale")]
    rows = schedule_table(specs, tiny_bundle)
    assert [r["feature"] for r in rows] == ["0/res/1", "0/mlp/5", "1/res/3"]  # by layer, then site
    c = float(tiny_bundle.ref_scale(1, "res")[3])
    assert rows[2]["scale"] == pytest.approx(c, abs=1e-6) and rows[2]["norm"] == pytest.approx(2 * c, abs=1e-5)
    assert rows[1]["scale"] == 1.0 and rows[1]["norm"] == 4.0
    assert "norm" not in rows[0] and rows[0]["strength"] == -4.0


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown edit mode 'scale'; valid: add, rescale"):
        SteerSpec(FeatureId(1, "res", 3), 1.0, mode="scale")
    with pytest.raises(ValueError, match="strength = 1e\\+06 is out of range"):
        SteerSpec(FeatureId(1, "res", 3), 1e6)
    with pytest.raises(ValueError, match="strength must be finite"):
        SteerSpec(FeatureId(1, "res", 3), float("inf"))
    with pytest.raises(ValueError, match="unknown units"):
        SteerSpec(FeatureId(1, "res", 3), 1.0, units="norm")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rescale_inside_model_generate_every_step(tiny_bundle, cache):
    """Removal inside transformers' generate loop (prefill + one-token decode steps, dynamic or
    static KV cache): f is ~0 on every token after position 0, at prefill and at each step."""
    b = tiny_bundle
    ids = b.tokenize(["The recipe needs flour"])["input_ids"]  # [1, seq]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=b.tokenizer.pad_token_id, cache_implementation=cache)
    calls = []
    with capture_sites({0: b.module(1, "res")}, {}, transform=lambda _k, h: calls.append(h)):
        out = b.model.generate(input_ids=ids, **kw)  # [1, seq + 6]
    z_clean = b.encode(1, "res", torch.cat(calls, 1))[0]  # [seq + 5, d_sae]
    f = int(z_clean[1:].sum(0).argmax())
    assert z_clean[1:, f].max() > 0
    rows = [[SteerSpec(FeatureId(1, "res", f), 0.0, mode="rescale")]]
    calls.clear()
    with steering(b, rows), capture_sites({0: b.module(1, "res")}, {}, transform=lambda _k, h: calls.append(h)):
        b.model.generate(input_ids=out[:, :ids.shape[1]], **kw)
    assert [c.shape[1] for c in calls] == [ids.shape[1]] + [1] * 5  # prefill, then one token per step
    z = b.encode(1, "res", torch.cat(calls, 1))[0, :, f]  # [seq + 5]
    assert float(z[1:].abs().max()) < 1e-3
    assert count_hooks(b.model) == 0


def test_schedule_shows_each_push_relative_to_the_residual_norm(tiny_bundle):
    """Issue 18: the added norm |s| c_f ||d_f|| as a percentage of the median residual norm at the
    layer, recomputed here from hidden states the model returns."""
    import torch

    from steering.bundle import REFERENCE_TEXT
    from steering.features import parse_feature
    from steering.sinks import sink_mask
    from steering.steer import SteerSpec, schedule_table

    from steering.sites import decoder_layers

    enc = tiny_bundle.tokenizer(REFERENCE_TEXT, return_tensors="pt")
    f = parse_feature("1/res/3")
    seen = {}
    # a plain hook on block 1 (not output_hidden_states: transformers 5 leaves its recording hooks installed)
    handle = decoder_layers(tiny_bundle.model)[f.layer].register_forward_hook(
        lambda _m, _i, out: seen.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            tiny_bundle.model(**enc)
    finally:
        handle.remove()
    h = seen["h"].float()  # [1, seq, d_model]: the output of block 1
    keep = enc["attention_mask"].bool() & ~sink_mask(h, enc["attention_mask"])
    median = float(h[keep].norm(dim=-1).median())
    row = schedule_table([SteerSpec(f, -4.0)], tiny_bundle)[0]
    added = 4.0 * row["scale"] * float(tiny_bundle.decoder(1, "res")[3].norm())
    assert row["pct_of_residual"] == pytest.approx(100 * added / median, rel=1e-3)


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_token_scope_edits_only_its_positions(tiny_bundle, scope):
    """Issue 18: scope "prompt" edits the prompt's positions only, "generated" the new tokens' only.
    Read downstream (layer 2) of the edit (layer 1): with causal attention, positions before the
    first generated one see only prompt positions."""
    import torch

    from steering.features import parse_feature
    from steering.sites import capture_sites
    from steering.steer import SteerSpec, steering

    ids = tiny_bundle.tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    n_prompt = ids.shape[1] - 2  # the last two positions play the generated tokens
    mask = torch.ones(1, n_prompt, dtype=torch.long)
    key = (2, "res")
    spec = [[SteerSpec(parse_feature("1/res/3"), 8.0)]]

    def resid(how: str | None) -> torch.Tensor:
        store: dict = {}
        with torch.no_grad(), capture_sites({key: tiny_bundle.module(*key)}, store):
            if how is None:
                tiny_bundle.model(input_ids=ids)
            else:
                with steering(tiny_bundle, spec, mask, scope=how):
                    tiny_bundle.model(input_ids=ids)
        return store[key][0]  # [seq, d_model]

    plain, every, scoped = resid(None), resid("all"), resid(scope)
    p, g = slice(1, n_prompt), slice(n_prompt, None)  # position 0 (the sink) is never edited
    if scope == "prompt":
        assert torch.equal(scoped[:n_prompt], every[:n_prompt])  # the prompt is steered as with "all"
        assert (scoped[g] - every[g]).norm(dim=-1).min() > 1e-4  # the new tokens themselves are not
        assert (scoped[p] - plain[p]).norm(dim=-1).min() > 1e-4
    else:
        assert torch.equal(scoped[:n_prompt], plain[:n_prompt])  # the prompt is left alone
        assert (scoped[g] - plain[g]).norm(dim=-1).min() > 1e-4


def test_unknown_scope_is_refused(tiny_bundle):
    from steering.steer import steering

    with pytest.raises(ValueError, match="unknown scope"):
        with steering(tiny_bundle, [[]], None, scope="everything"):
            pass


def test_a_seed_set_merges_its_flow_graphs_and_steers_each_node_once(tiny_bundle):
    """Issue 18: several seed features: the union of their plans; an extra node is included in the
    graphs that have it; a node in none is refused."""
    from steering.flow import build_flow_graph
    from steering.graph import merge_graphs
    from steering.settings import SteerSettings
    from steering.steer import plan_run

    a, b = "1/res/3", "2/res/5"
    one = {x: plan_run(tiny_bundle, SteerSettings.create(x, t_res=0.0))[1] for x in (a, b)}
    graphs, both = plan_run(tiny_bundle, SteerSettings.create(f"{a}, {b}", t_res=0.0))
    assert [str(g.seed) for g in graphs] == [a, b]
    assert [s.feature for s in both] == list(dict.fromkeys(s.feature for x in (a, b) for s in one[x]))
    in_a = {n.id for n in graphs[0].nodes}
    extra = next(n for n in build_flow_graph(tiny_bundle, b, t_res=0.9).nodes if not n.in_span and n.id not in in_a)
    _, plus = plan_run(tiny_bundle, SteerSettings.create(f"{a}, {b}", t_res=0.9, include=[str(extra.id)]))
    assert extra.id in {s.feature for s in plus}  # only b's graph has it: included there, not refused by a's
    everywhere = {n.id for g in graphs for n in g.nodes}
    outside = next(FeatureId(l, "res", i) for l in tiny_bundle.layers for i in range(tiny_bundle.width(l, "res"))
                   if FeatureId(l, "res", i) not in everywhere)
    with pytest.raises(ValueError, match="not a node of the flow graphs of"):
        plan_run(tiny_bundle, SteerSettings.create(f"{a}, {b}", include=[str(outside)]))
    merged = merge_graphs(graphs)
    assert {n.id for n in merged.nodes} == {n.id for g in graphs for n in g.nodes}
    assert len(merged.nodes) == len({n.id for n in merged.nodes})
    assert merged.l_start == min(g.l_start for g in graphs) and merged.l_end == max(g.l_end for g in graphs)
    assert {str(n.id) for n in merged.nodes if n.role == "seed"} == {a, b}
    assert merge_graphs(graphs[:1]) is graphs[0]
