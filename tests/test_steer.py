"""Steering exactness, schedules, isolation, batching and reproducibility on tiny models."""

import math

import pytest
import torch

from steering.features import FeatureId
from steering.generate import generate_variants
from steering.graph import FlowEdge, FlowGraph, FlowNode
from steering.sites import capture_sites, count_hooks
from steering.steer import SteerSpec, plan, schedule_strength, schedule_table, steering

KEYS = [(l, s) for l in range(3) for s in ("res", "mlp", "attn")]


def _capture(bundle, ids, rows=None):
    store = {}
    mods = {k: bundle.module(*k) for k in KEYS}
    if rows is None:
        with capture_sites(mods, store):
            bundle.model(input_ids=ids)
    else:
        with steering(bundle, rows), capture_sites(mods, store):
            bundle.model(input_ids=ids)
    return store


def test_added_direction_is_exact_and_only_where_scheduled(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["The angry man shouted"])["input_ids"]
    f = FeatureId(1, "mlp", 5)
    clean = _capture(b, ids)
    steered = _capture(b, ids, [[SteerSpec(f, 2.5)]])
    delta = 2.5 * b.ref_scale(1, "mlp")[5] * b.decoder(1, "mlp")[5]
    torch.testing.assert_close(steered[(1, "mlp")], clean[(1, "mlp")] + delta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[(1, "res")], clean[(1, "res")] + delta, rtol=1e-4, atol=1e-4)
    for k in [(0, "res"), (0, "mlp"), (0, "attn"), (1, "attn")]:
        torch.testing.assert_close(steered[k], clean[k])
    assert not torch.allclose(steered[(2, "res")], clean[(2, "res")])  # it does propagate
    assert count_hooks(b.model) == 0


def test_raw_units_skip_the_reference_scale(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["Once upon a time"])["input_ids"]
    clean = _capture(b, ids)
    steered = _capture(b, ids, [[SteerSpec(FeatureId(0, "res", 3), 4.0, units="raw")]])
    torch.testing.assert_close(steered[(0, "res")], clean[(0, "res")] + 4.0 * b.decoder(0, "res")[3])


def test_rescale_zero_removes_the_feature_but_not_at_position_0(tiny_bundle):
    b = tiny_bundle
    ids = b.tokenize(["The recipe needs flour sugar eggs and butter"])["input_ids"]
    clean = _capture(b, ids)
    z = b.encode(1, "res", clean[(1, "res")])[0]  # [seq, d_sae]
    f = int(z[1:].sum(0).argmax())
    assert z[1:, f].max() > 0
    steered = _capture(b, ids, [[SteerSpec(FeatureId(1, "res", f), 0.0, mode="rescale")]])
    z2 = b.encode(1, "res", steered[(1, "res")])[0]
    assert float(z2[1:, f].abs().max()) < 1e-3 * float(z[1:, f].max()) + 1e-4
    torch.testing.assert_close(steered[(1, "res")][0, 0], clean[(1, "res")][0, 0])  # sink untouched


def test_schedules_match_hand_computed_values():
    assert schedule_strength(12, "exp", 3.0, alpha=-0.25) == pytest.approx(3 * math.exp(-3))
    assert schedule_strength(4, "linear", 8.0, l_start=2, l_end=6, s_end=1.0) == pytest.approx(4.5)
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
    base = plan(g, "baseline", strength=5.0)
    assert [str(s.feature) for s in base] == ["1/res/2"] and base[0].strength == 5.0
    single = plan(g, "single", layer=1, strength=5.0)
    assert sorted(str(s.feature) for s in single) == ["1/mlp/7", "1/res/2"]
    cum = plan(g, "cumulative", layer=2, strength=3.0, schedule="exp", alpha=-0.25)
    assert {str(s.feature) for s in cum} == {"0/res/1", "1/res/2", "2/res/3", "1/mlp/7", "2/attn/2"}
    for s in cum:
        assert s.strength == pytest.approx(3.0 * math.exp(-0.25 * s.feature.layer))
    lin = plan(g, "cumulative", layer=2, strength=8.0, schedule="linear", s_end=2.0)
    assert {t["feature"]: t["strength"] for t in schedule_table(lin)}["1/res/2"] == pytest.approx(5.0)
    cum2 = plan(g, "cumulative", layer=2, exclude=["1/mlp/7"], include=["0/attn/1"], sites=("res",))
    assert {str(s.feature) for s in cum2} == {"0/res/1", "1/res/2", "2/res/3", "0/attn/1"}
    rem = plan(g, "cumulative", layer=1, strength=-2.0, mode="rescale")
    assert all(s.mode == "rescale" and s.strength == -2.0 for s in rem)
    with pytest.raises(ValueError, match="valid: 0..2"):
        plan(g, "single", layer=5)
    with pytest.raises(ValueError, match="not a node"):
        plan(g, "single", include=["2/res/0"])
    with pytest.raises(ValueError, match="strength must be finite"):
        plan(g, "single", strength=float("nan"))
    with pytest.raises(ValueError, match="valid: baseline, single, cumulative"):
        plan(g, "everything")


def test_batched_variants_equal_one_by_one(tiny_bundle):
    variants = {"base": [], "a": [SteerSpec(FeatureId(1, "res", 3), 6.0)],
                "b": [SteerSpec(FeatureId(0, "mlp", 2), -4.0), SteerSpec(FeatureId(2, "res", 9), 3.0)]}
    for temperature in (0.0, 1.27):
        batched = generate_variants(tiny_bundle, "I think ", variants, seeds=[3, 4], max_new_tokens=8,
                                    temperature=temperature, metrics=False)
        for g in batched:
            alone = generate_variants(tiny_bundle, "I think ", {g.variant: variants[g.variant]}, seeds=[g.seed],
                                      max_new_tokens=8, temperature=temperature, metrics=False)[0]
            assert alone.token_ids == g.token_ids, (temperature, g.variant, g.seed)
    texts = {g.variant: g.token_ids for g in batched if g.seed == 3}
    assert texts["a"] != texts["base"]


def test_strength_zero_reproduces_baseline_and_seeds_differ(tiny_bundle):
    out = generate_variants(tiny_bundle, "I think ", {"base": [], "zero": [SteerSpec(FeatureId(1, "res", 3), 0.0)]},
                            seeds=[0, 1], max_new_tokens=10, metrics=True)
    by = {(g.variant, g.seed): g for g in out}
    assert by[("base", 0)].token_ids == by[("zero", 0)].token_ids
    assert by[("base", 0)].token_ids != by[("base", 1)].token_ids
    m = by[("zero", 0)].metrics
    assert m["perplexity"] > 1 and 0 < m["distinct_1"] <= 1 and "1/res/3" in m["feature_activation"]


def test_hooks_removed_after_errors(tiny_bundle):
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny_bundle, [[SteerSpec(FeatureId(1, "res", 3), 1.0)]]):
            assert count_hooks(tiny_bundle.model) == 1
            raise RuntimeError("boom")
    assert count_hooks(tiny_bundle.model) == 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_variants(tiny_bundle, "I think ", {"a": [SteerSpec(FeatureId(1, "res", 3), 1.0)]}, seeds=[0],
                          max_new_tokens=10_000)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_variants(tiny_bundle, "  ", {"a": []}, seeds=[0])
    assert count_hooks(tiny_bundle.model) == 0


def test_cli_steer_json_and_bad_values(tiny_llama_preset):
    import json
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "steering", "steer", "1/res/3", "--preset", str(tiny_llama_preset)]
    ok = subprocess.run(cmd + ["--mode", "cumulative", "--strength", "3", "--alpha", "-0.25", "--schedule", "exp",
                               "--seed", "0", "--max-new-tokens", "6", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert {"prompt", "baseline", "steered", "schedule", "metrics"} <= set(out)
    assert out["prompt"] == "I think " and all({"layer", "feature", "strength"} <= set(r) for r in out["schedule"])
    for extra, msg in [(["--strength", "nan"], "--strength must be finite"), (["--mode", "all"], "valid: baseline"),
                       (["--max-new-tokens", "100000"], "--max-new-tokens = 100000 is out of range"),
                       (["--prompt", ""], "--prompt is empty"), (["--schedule", "cos"], "valid: exp, linear"),
                       (["--strength", "1e9"], "out of range")]:
        r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr, (extra, r.stderr[-500:])
