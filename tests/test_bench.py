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
