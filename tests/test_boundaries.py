"""Property-based tests of the library's boundary functions (issue 11): whatever a user, an API
caller or the CLI sends, each boundary either returns a clean value inside the allowed range or
raises ValueError naming the field and what is allowed, never another exception. Also: flow
graphs built from any valid seed and thresholds are well formed, and steering with arbitrary
valid specs leaves no hook behind."""

from __future__ import annotations

import json
import math
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steering import limits
from steering.features import FeatureId, parse_feature
from steering.flow import build_flow_graph
from steering.generate import check_request, generate_variants
from steering.graph import FlowGraph
from steering.judging.base import check_args
from steering.presets import SITES
from steering.sites import count_hooks
from steering.settings import CONDITIONS, SCHEDULES
from steering.steer import SteerSpec, plan, schedule_strength

ANY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=20), st.lists(st.integers(), max_size=3))
ODD_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)  # control, format, surrogate-free, RTL, emoji ...
FAST = settings(max_examples=200, deadline=None)
MODEL = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(ANY_SCALAR)
def test_check_number_returns_a_finite_value_in_range_or_names_the_field(value):
    try:
        out = limits.check_number("strength", value, 200.0)
    except ValueError as e:
        assert str(e).startswith("strength ")
        assert "allowed: -200..200" in str(e) or "must be a number" in str(e)
        return
    assert isinstance(out, float) and math.isfinite(out) and abs(out) <= 200.0


@FAST
@given(ANY_SCALAR)
def test_check_int_returns_an_int_in_range_or_names_the_range(value):
    try:
        out = limits.check_int("samples", value, 1, 8)
    except ValueError as e:
        assert str(e).startswith("samples ") and "1..8" in str(e)
        return
    assert type(out) is int and 1 <= out <= 8


@FAST
@given(ODD_TEXT)
def test_clean_text_drops_control_characters_and_is_idempotent(text):
    try:
        out = limits.clean_text("prompt", text, 120)
    except ValueError as e:
        assert str(e).startswith("prompt is ") and ("empty" in str(e) or "at most 120" in str(e))
        return
    assert out.strip() and len(out) <= 120
    assert all(ch in "\n\t" or unicodedata.category(ch)[0] != "C" for ch in out)
    assert limits.clean_text("prompt", out, 120) == out


@FAST
@given(st.dictionaries(st.sampled_from(["strength", "s_end", "alpha", "r", "temperature", "top_p", "max_new_tokens",
                                        "samples", "seed", "prompt"]), ANY_SCALAR, max_size=4))
def test_steer_args_are_clean_or_refused_by_name(values):
    try:
        out = limits.check_steer_args(**values)
    except ValueError as e:
        assert any(str(e).startswith(f"{k} ") for k in values), str(e)
        return
    assert set(out) == set(values)
    for v in out.values():
        if isinstance(v, float):
            assert math.isfinite(v)


@FAST
@given(st.one_of(ODD_TEXT, st.from_regex(r"\s*-?\d{1,6}\s*/\s*[a-z]{1,6}\s*/\s*-?\d{1,8}\s*", fullmatch=True),
                 ANY_SCALAR))
def test_parse_feature_round_trips_or_explains(text):
    try:
        fid = parse_feature(text)
    except ValueError as e:
        msg = str(e)
        assert "feature id" in msg and ("expected layer/site/index" in msg or "valid sites" in msg
                                         or "must be a string" in msg)
        assert len(msg) < 300  # a huge input is not echoed in full
        return
    assert fid.site in SITES and fid.layer >= 0 and fid.index >= 0
    assert parse_feature(str(fid)) == fid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(-3, 6), site=st.sampled_from([*SITES, "resid"]), index=st.integers(-5, 200))
def test_parse_feature_against_a_bundle_accepts_exactly_the_existing_features(tiny_bundle, layer, site, index):
    text = f"{layer}/{site}/{index}"
    exists = (layer, site) in tiny_bundle.saes and 0 <= index < tiny_bundle.width(layer, site)
    try:
        fid = parse_feature(text, tiny_bundle)
    except ValueError as e:
        assert not exists, e
        assert "valid" in str(e) or "non-negative layer and index" in str(e)
        return
    assert exists and fid == FeatureId(layer, site, index)


@FAST
@given(layer=st.integers(0, 40), s=st.floats(-200, 200), alpha=st.floats(-5, -0.001),
       l_start=st.integers(0, 20), span=st.integers(0, 20), s_end=st.floats(-200, 200))
def test_schedules_are_exact_and_bounded(layer, s, alpha, l_start, span, s_end):
    e = schedule_strength(layer, "exp", s, alpha)
    assert e == pytest.approx(s * math.exp(alpha * layer)) and abs(e) <= abs(s)  # alpha < 0: decays
    l_end = l_start + span
    assert schedule_strength(l_start, "linear", s, alpha, l_start, l_end, s_end) == pytest.approx(s)
    lin = schedule_strength(min(max(layer, l_start), l_end), "linear", s, alpha, l_start, l_end, s_end)
    assert min(s, s_end) - 1e-9 <= lin <= max(s, s_end) + 1e-9  # inside the span: between the end values
    assert schedule_strength(layer, "constant", s) == s


@pytest.fixture(scope="module")
def tiny_graph(tiny_bundle) -> FlowGraph:
    return build_flow_graph(tiny_bundle, "1/res/3", t_res=0.0)


@settings(max_examples=150, deadline=None)
@given(condition=st.sampled_from([*CONDITIONS, "all"]), layer=st.one_of(st.none(), st.integers(-2, 5)),
       strength=st.floats(allow_nan=True, allow_infinity=True), schedule=st.sampled_from([*SCHEDULES, "cosine"]),
       alpha=st.floats(-10, 10), s_end=st.floats(-300, 300), mode=st.sampled_from(["add", "rescale", "scale"]))
def test_plan_gives_finite_bounded_specs_or_a_clear_error(tiny_graph, condition, layer, strength, schedule, alpha,
                                                         s_end, mode):
    try:
        specs = plan(tiny_graph, condition, layer, strength, schedule, alpha, s_end, mode)
    except ValueError as e:
        msg = str(e)
        assert any(w in msg for w in ("valid", "allowed", "finite", "no feature left")), msg
        return
    bound = limits.MAX_ABS_R if mode == "rescale" else limits.MAX_ABS_STRENGTH
    assert specs and all(math.isfinite(s.strength) and abs(s.strength) <= bound for s in specs)
    nodes = {n.id for n in tiny_graph.nodes}
    assert all(s.feature in nodes for s in specs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(feature=st.sampled_from(["0/res/1", "1/res/3", "2/mlp/5", "1/attn/2", "2/res/40"]),
       t_res=st.floats(0, 1), t_module=st.floats(0, 1))
def test_flow_graphs_are_well_formed_for_any_thresholds(tiny_bundle, feature, t_res, t_module):
    g = build_flow_graph(tiny_bundle, feature, t_res=t_res, t_module=t_module)
    assert g.l_start <= parse_feature(feature).layer <= g.l_end
    ids = [n.id for n in g.nodes]
    assert len(ids) == len(set(ids)) and g.seed in ids
    assert all(n.site == "res" or n.score >= t_module for n in g.nodes)
    assert all(e.source.layer <= e.target.layer for e in g.edges)
    assert json.loads(json.dumps(g.to_json()))["seed"] == feature


@FAST
@given(texts=st.one_of(st.lists(st.text(max_size=30), max_size=3), ANY_SCALAR), theme=st.one_of(ODD_TEXT, ANY_SCALAR),
       task=st.sampled_from(["activate", "remove", "amplify"]))
def test_judge_arguments_are_checked(texts, theme, task):
    try:
        out = check_args(texts, theme, task)
    except ValueError as e:
        assert any(w in str(e) for w in ("task", "theme", "texts")), str(e)
        return
    assert out and out == " ".join(out.split())


@MODEL
@given(prompt=ODD_TEXT, max_new=st.integers(-5, 10_000), rows=st.integers(-1, 100))
def test_generation_requests_are_refused_before_compute_or_accepted_clean(tiny_bundle, prompt, max_new, rows):
    try:
        clean, _ = check_request(tiny_bundle, prompt, max_new, rows)
    except ValueError as e:
        assert any(w in str(e) for w in ("prompt", "max_new_tokens", "rows")), str(e)
        return
    assert clean.strip() and 1 <= max_new <= limits.MAX_NEW_TOKENS and 1 <= rows <= limits.MAX_ROWS


@MODEL
@given(specs=st.lists(st.tuples(st.sampled_from(["0/res/1", "1/res/3", "2/mlp/5", "1/attn/2", "2/res/999"]),
                                st.floats(-250, 250), st.sampled_from(["add", "rescale"])), max_size=4))
def test_steering_with_arbitrary_specs_leaves_no_hook(tiny_bundle, specs):
    try:
        steer = [SteerSpec(parse_feature(f), s, mode) for f, s, mode in specs]
        out = generate_variants(tiny_bundle, "I think ", {"s": steer}, seeds=[0], max_new_tokens=2, metrics=False)
        assert len(out) == 1
    except ValueError as e:
        assert "out of range" in str(e) or "valid indices" in str(e), str(e)
    assert count_hooks(tiny_bundle.model) == 0


@FAST
@given(rows=st.integers(1, 64), prompt=st.integers(0, 600), new=st.integers(1, 200))
def test_request_cost_is_refused_exactly_above_the_budget(rows, prompt, new):
    cost = rows * (prompt + new)
    if cost > limits.MAX_COST:
        with pytest.raises(ValueError, match=r"request too large.*at most \d+"):
            limits.check_cost(rows, prompt, new)
    else:
        assert limits.check_cost(rows, prompt, new) == cost


def test_app_steer_refuses_a_request_over_the_cost_budget_before_generating(tiny_bundle, monkeypatch):
    """The app's /steer and the CLI pass check_cost: a request over MAX_COST is refused before any
    generation (the generate call is never reached), one under it runs."""
    from steering import controls as C

    calls = []

    def fake(*a, **k):
        calls.append(a)
        return []

    monkeypatch.setattr(limits, "MAX_COST", 100)
    steer = {"baseline": [], "steered": [SteerSpec(parse_feature("1/res/3"), 2.0)]}
    with pytest.raises(ValueError, match="request too large"):  # 3 variants x 4 samples x (3 + 20) > 100
        C.generate_with_controls(tiny_bundle, "I think ", steer, [0, 1, 2, 3], ("random",), max_new_tokens=20,
                                 check_cost=True, generate=fake)
    assert calls == []
    C.generate_with_controls(tiny_bundle, "I think ", steer, [0], ("random",), max_new_tokens=20, check_cost=True,
                             generate=fake)
    assert len(calls) == 1
