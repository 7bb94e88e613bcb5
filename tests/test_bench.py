"""The benchmark runs end to end on a tiny preset and reports every figure (no timing asserts)."""

from steering import bench
from steering.flow import build_flow_graph


def test_bench_functions_report_their_fields(tiny_bundle):
    g = build_flow_graph(tiny_bundle, "1/res/3")
    flow = bench.flow_latency(tiny_bundle, n=10)
    assert flow["match_tables"] == 10 and flow["flow_graphs"] == 10
    st = bench.steering_overhead(tiny_bundle, g, max_new_tokens=4, batch=2, repeat=1)
    assert st["n_specs_cumulative"] >= st["n_specs_single"] >= 1 and st["steer_overhead_single"] > 0
    sbs = bench.side_by_side_cost(tiny_bundle, g, max_new_tokens=4, repeat=1)
    assert sbs["side_by_side_cost"] > 0
    checked = bench.check_targets({"steering": st, "flow": flow, "side_by_side": sbs})
    assert set(checked) >= {"steer_overhead_single", "side_by_side_cost", "flow_ms_cached_median"}
    assert all(isinstance(v["met"], bool) for v in checked.values())


def test_steering_overhead_covers_every_site(tiny_bundle):
    g = build_flow_graph(tiny_bundle, "1/res/3")
    st = bench.steering_overhead(tiny_bundle, g, max_new_tokens=3, batch=1, repeat=1)
    assert st["n_specs_all_sites"] == len(tiny_bundle.saes) and st["steer_overhead_all_sites"] > 0
    un = bench.flow_uncached(tiny_bundle, n=2)
    assert un["flow_ms_uncached_median"] > 0 and un["flow_uncached_graphs"] == 2


def test_gemma_scale_mode_runs_at_toy_sizes(capsys):
    """The --gemma-scale path (meant for a GPU) end to end on a shrunken config: every figure present."""
    import json

    from steering import cli

    rc = cli.main(["bench", "--gemma-scale", "--layers", "2", "--d-model", "64", "--width", "128", "--vocab", "512",
                   "--max-new-tokens", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["sizes"]["layers"] == 2
    assert out["memory"]["saes_gb"] > 0 and out["flow"]["flow_ms_uncached_median"] > 0
    assert out["decode"]["tokens_per_s_plain"] > 0 and out["decode"]["steer_overhead_decode"] > 0
    assert {"steer_overhead_single", "flow_ms_cached_median", "side_by_side_cost"} <= set(out["targets"])
