"""Matching and flow graphs on hand-built decoders where the right flow is known by construction."""

import itertools
import json
import subprocess
import sys

import pytest
import torch

from steering.bundle import Bundle
from steering.features import FeatureId
from steering.flow import (build_flow_graph, build_tables, match, match_tables, match_top1, match_top1_both,
                           match_topk, neighbour_pairs, pearson_match, permutation_match, predecessors, successor,
                           successors, table)
from steering.synthetic import make_tiny_preset

N_LAYERS, D = 5, 64
W = {"res": 5, "mlp": 2, "attn": 2}


def _unit(v):
    return v / v.norm()


@pytest.fixture(scope="module")
def hand_bundle(tmp_path_factory):
    """Decoders from an orthonormal basis: unrelated features have cosine 0 exactly.

    - u  (res index 0, every layer): e0 + 0.2 * e_(50+l): copied with noise, cos ~0.96 per link.
    - v  (res index 1): born in the MLP of layer 2 (2/mlp/0 = e1); res index 1 holds e1 at
      layers 2..4 and unrelated directions at layers 0..1 -> the chain is cut below layer 2.
    - w  (res index 2): e2 at layers 0..2, faded at layer 3 (cos 0.3) -> cut above layer 2.
    - attn layer 1 index 0 = 0.3 e0 + ... : a weak attention predecessor of 1/res/0.
    - forward != backward: layer 3 res 3 = e3, res 4 = e3 + 0.5 e4; layer 4 res 3 = e3 + 0.4 e4.
    - 3/attn/1 = e2: the successor of 2/res/2 in A_3.
    """
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0].T  # rows
    free = iter([*range(5, 50), *range(55, 60), 62, 63])
    dec = {}
    for l in range(N_LAYERS):
        res = torch.stack([_unit(basis[next(free)]) for _ in range(W["res"])])
        res[0] = _unit(basis[0] + 0.2 * basis[50 + l])
        res[1] = _unit(basis[1] + 0.2 * basis[50 + l]) if l >= 2 else basis[next(free)]
        res[2] = basis[2] if l <= 2 else _unit(0.3 * basis[2] + 0.954 * basis[60])
        if l == 3:
            res[3], res[4] = basis[3], _unit(basis[3] + 0.5 * basis[4])
        if l == 4:
            res[3] = _unit(basis[3] + 0.4 * basis[4])
        mlp = torch.stack([basis[next(free)] for _ in range(W["mlp"])])
        attn = torch.stack([basis[next(free)] for _ in range(W["attn"])])
        if l == 2:
            mlp[0] = basis[1]
        if l == 1:
            attn[0] = _unit(0.3 * basis[0] + 0.954 * basis[61])
        if l == 3:
            attn[1] = basis[2]  # the fading w (2/res/2) is read by layer 3's attention
        dec[(l, "res")], dec[(l, "mlp")], dec[(l, "attn")] = res, mlp, attn
    path = make_tiny_preset(tmp_path_factory.mktemp("hand"), n_layers=N_LAYERS, d_model=D, decoders=dec)
    return Bundle.load(str(path), device="cpu")


def test_copied_direction_spans_all_layers(hand_bundle):
    g = build_flow_graph(hand_bundle, "2/res/0")
    chain = g.residual_chain()
    assert [str(n.id) for n in chain] == [f"{l}/res/0" for l in range(N_LAYERS)]
    assert (g.l_start, g.l_end) == (0, N_LAYERS - 1)
    assert all(n.score > 0.9 for n in chain)
    # the weak attention predecessor of 1/res/0 is kept at t_module 0.15 and dropped at 0.35
    att = [n for n in g.nodes if n.site == "attn"]
    assert [str(n.id) for n in att] == ["1/attn/0"] and abs(att[0].score - 0.3 / 1.0198) < 0.02
    assert not [n for n in build_flow_graph(hand_bundle, "2/res/0", t_module=0.35).nodes if n.site == "attn"]


def test_feature_born_in_mlp_is_cut_below_its_birth(hand_bundle):
    g = build_flow_graph(hand_bundle, "4/res/1")
    assert (g.l_start, g.l_end) == (2, 4)
    assert [str(n.id) for n in g.residual_chain()] == ["2/res/1", "3/res/1", "4/res/1"]
    mlp = [n for n in g.nodes if n.site == "mlp" and n.in_span]
    assert [str(n.id) for n in mlp] == ["2/mlp/0"] and mlp[0].score > 0.95
    node2 = g.node("2/res/1")
    assert node2.s_res == pytest.approx(0.0, abs=1e-5) and node2.s_mlp > 0.95  # "newborn in the MLP"


def test_fading_feature_is_cut_above(hand_bundle):
    g = build_flow_graph(hand_bundle, "0/res/2")
    assert (g.l_start, g.l_end) == (0, 2)
    outside = [n for n in g.nodes if n.site == "res" and not n.in_span]
    assert [n.layer for n in outside] == [3, 4]
    assert g.node("3/res/2").score == pytest.approx(0.3, abs=0.01)


def test_forward_relation_is_not_the_inverse_of_backward(hand_bundle):
    f1 = FeatureId(3, "res", 3)
    nxt, cos = successor(hand_bundle, f1)
    assert nxt == FeatureId(4, "res", 3) and cos == pytest.approx(1 / 1.16 ** 0.5, abs=1e-3)
    back = predecessors(hand_bundle, nxt).res
    assert back[0] == FeatureId(3, "res", 4)  # the successor's best predecessor is another feature
    g = build_flow_graph(hand_bundle, f1, direction="forward")
    assert g.node("4/res/3").s_res == pytest.approx(back[1], abs=1e-5)
    assert {(str(e.source), str(e.target)) for e in g.edges} >= {("3/res/3", "4/res/3")}


def test_json_round_trip_and_thresholds_validated(hand_bundle):
    from steering.graph import FlowGraph
    g = build_flow_graph(hand_bundle, "3/res/1")
    d = json.loads(json.dumps(g.to_json()))
    assert FlowGraph.from_json(d).to_json() == d
    assert {"id", "layer", "site", "index", "score"} <= set(d["nodes"][0])
    labelled = build_flow_graph(hand_bundle, "3/res/1", catalog_labels={"2/mlp/0": "born here", "3/res/1": "seed"})
    assert labelled.node("2/mlp/0").label == "born here" and labelled.node("3/res/1").label == "seed"
    assert labelled.node("2/res/1").label == ""
    with pytest.raises(ValueError, match="t_res must be a cosine threshold"):
        build_flow_graph(hand_bundle, "3/res/1", t_res=float("nan"))
    with pytest.raises(ValueError, match="valid: both, backward, forward"):
        build_flow_graph(hand_bundle, "3/res/1", direction="sideways")


def test_mlp_seed_starts_from_its_residual_match(hand_bundle):
    g = build_flow_graph(hand_bundle, "2/mlp/0")
    assert g.seed == FeatureId(2, "mlp", 0)
    assert FeatureId(2, "res", 1) in [n.id for n in g.residual_chain()]
    assert any("top-1 residual match" in n for n in g.notes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_equals_naive_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.nn.functional.normalize(torch.randn(37, 16, generator=gen), dim=-1)
    dst = torch.nn.functional.normalize(torch.randn(23, 16, generator=gen), dim=-1)
    m = match_top1(src, dst, chunk=5)
    for i in range(37):
        cos = [float(torch.dot(src[i], dst[j]) / (src[i].norm() * dst[j].norm())) for j in range(23)]
        assert int(m.index[i]) == max(range(23), key=cos.__getitem__)
        assert float(m.cosine[i]) == pytest.approx(max(cos), abs=1e-5)
    top5 = match(src, dst, "top5_cosine")
    assert top5.index.shape == (37, 5) and bool((top5.index[:, 0] == m.index).all())
    r5 = match(src, dst, "random_top5", seed=3)
    assert all(int(r5.index[i]) in top5.index[i].tolist() for i in range(37))
    perm = match(dst, src, "permutation")  # 23 -> 37: one-to-one
    assert len(set(perm.index.tolist())) == 23
    with pytest.raises(ValueError, match="valid: top1_cosine"):
        match(src, dst, "pearson-ish")


def test_cli_flow_json_and_errors(hand_bundle, capsys):
    from steering.cli import main
    preset = str(hand_bundle.preset.root) + "/preset.json"
    ok = subprocess.run([sys.executable, "-m", "steering", "flow", "4/res/1", "--json", "--preset", preset],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["seed"] == "4/res/1" and (out["l_start"], out["l_end"]) == (2, 4)
    assert {"id", "layer", "site", "index", "score"} <= set(out["nodes"][0])
    assert {"source", "target", "cosine"} <= set(out["edges"][0])
    for bad, msg in [("9/res/1", "valid layers: 0..4"), ("1/res/99", "valid indices for 1/res: 0..4"),
                     ("1/resid/0", "valid sites"), ("abc", "malformed")]:
        assert main(["flow", bad, "--preset", preset]) == 2, bad
        assert msg in capsys.readouterr().err, bad


def _rand_unit(n, d, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)


def test_topk_and_both_directions_equal_naive_reference():
    gen = torch.Generator().manual_seed(5)
    a, b = _rand_unit(41, 12, gen), _rand_unit(29, 12, gen)
    sim = torch.tensor([[float(torch.dot(a[i], b[j])) for j in range(29)] for i in range(41)])  # [41, 29]
    top3 = match_topk(a, b, 3, chunk=7)
    assert top3.index.tolist() == [sorted(range(29), key=lambda j: -sim[i, j])[:3] for i in range(41)]
    ab, ba = match_top1_both(a, b, chunk=6)
    assert ab.index.tolist() == sim.argmax(1).tolist() and ba.index.tolist() == sim.argmax(0).tolist()
    assert torch.allclose(ba.cosine, sim.max(0).values, atol=1e-6)
    with pytest.raises(ValueError, match="only SAEs trained on the same space"):
        match_top1(a, torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must be in 1..29"):
        match_topk(a, b, 30)


@pytest.mark.parametrize("n,m", [(5, 5), (4, 6), (6, 4)])
def test_permutation_matching_is_the_best_assignment(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    a, b = _rand_unit(n, 8, gen), _rand_unit(m, 8, gen)
    sim = a @ b.T
    got = permutation_match(a, b)
    k = min(n, m)
    best = max((sum(float(sim[i, j]) for i, j in zip(rows, cols)), rows, cols)
               for rows in itertools.combinations(range(n), k) for cols in itertools.permutations(range(m), k))
    assigned = [i for i in range(n) if i in best[1]]
    assert sum(float(got.cosine[i]) for i in assigned) == pytest.approx(best[0], abs=1e-5)
    assert len({int(got.index[i]) for i in assigned}) == k  # one-to-one on the assigned rows
    for i in set(range(n)) - set(assigned):  # surplus sources fall back to top-1
        assert int(got.index[i]) == int(sim[i].argmax())


def test_pearson_matching_equals_numpy_corrcoef():
    import numpy as np
    gen = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(200, 9, generator=gen))
    y = torch.relu(torch.randn(200, 7, generator=gen))
    y[:, 3] = 2 * x[:, 4] + 0.1 * y[:, 3]  # a strongly correlated pair
    y[:, 6] = 0  # a dead feature: correlation 0, never chosen over a live one by chance
    m = pearson_match(x, y, chunk=4)
    with np.errstate(invalid="ignore", divide="ignore"):  # the dead column has no variance
        corr = np.corrcoef(x.T.numpy(), y.T.numpy())[:9, 9:]  # [9, 7]
    corr = np.nan_to_num(corr)
    assert m.index.tolist() == corr.argmax(1).tolist()
    assert np.allclose(m.cosine.numpy(), corr.max(1), atol=1e-5)
    assert int(m.index[4]) == 3 and float(m.cosine[4]) > 0.99


def test_match_tables_from_decoders_equal_per_pair_reference():
    gen = torch.Generator().manual_seed(3)
    widths = {"res": 30, "mlp": 11, "attn": 13}
    dec = {(l, s): _rand_unit(w, 16, gen) for l in range(3) for s, w in widths.items()}
    tables = match_tables(dec)
    assert set(tables) == set(neighbour_pairs(dec))
    assert (((1, "res"), (0, "res")) in tables and ((0, "res"), (1, "res")) in tables
            and ((0, "res"), (-1, "res")) not in tables)
    for (src, dst), m in tables.items():
        sim = dec[src] @ dec[dst].T
        assert m.index.tolist() == sim.argmax(1).tolist(), (src, dst)
    perm = match_tables(dec, "permutation")
    assert len(set(perm[((1, "res"), (1, "mlp"))].index.tolist())) == 11


def test_layer0_has_no_residual_predecessor_and_successors_match_naive(hand_bundle):
    p = predecessors(hand_bundle, "0/res/0")
    assert p.res is None and p.mlp is not None and p.attn is not None
    s = successors(hand_bundle, "2/res/2")
    assert s.attn[0] == FeatureId(3, "attn", 1) and s.attn[1] == pytest.approx(1.0, abs=1e-5)
    assert successors(hand_bundle, f"{N_LAYERS - 1}/res/0") == (None, None, None)
    for i in range(W["res"]):
        f = hand_bundle.decoder(1, "res")[i]
        s = successors(hand_bundle, FeatureId(1, "res", i))
        for site, got in zip(("res", "mlp", "attn"), s):
            assert got[1] == pytest.approx(float((hand_bundle.decoder(2, site) @ f).max()), abs=1e-5)
    with pytest.raises(ValueError, match="residual features"):
        predecessors(hand_bundle, "1/mlp/0")


def test_graph_is_built_from_cached_tables(hand_bundle):
    n = build_tables(hand_bundle)
    assert n == len(neighbour_pairs(hand_bundle.saes))
    # the one-pass table (both directions) equals the on-demand single-direction one
    fwd = table(hand_bundle, (1, "res"), (2, "res"))
    assert fwd.index.tolist() == match_top1(hand_bundle.decoder(1, "res"), hand_bundle.decoder(2, "res")).index.tolist()
    before = set(hand_bundle._cache)
    build_flow_graph(hand_bundle, "2/res/0")
    assert set(hand_bundle._cache) == before  # lookups only


def test_mlp_seed_is_one_node_and_edges_are_unique(hand_bundle):
    g = build_flow_graph(hand_bundle, "2/mlp/0")
    ids = [n.id for n in g.nodes]
    assert len(ids) == len(set(ids))
    assert [n.id for n in g.nodes if n.role == "seed"] == [FeatureId(2, "mlp", 0)]
    pairs = [(e.source, e.target) for e in g.edges]
    assert len(pairs) == len(set(pairs))
    assert (FeatureId(2, "mlp", 0), FeatureId(2, "res", 1)) in pairs
    assert all(e.source.layer <= e.target.layer for e in g.edges)  # earlier -> later


def test_graph_methods_and_approximate_sites(hand_bundle, monkeypatch):
    g = build_flow_graph(hand_bundle, "2/res/0", method="permutation")
    assert g.method == "permutation" and [n.id.index for n in g.residual_chain()] == [0] * N_LAYERS
    with pytest.raises(ValueError, match="valid: top1_cosine, random_top5, permutation, top1_pearson"):
        build_flow_graph(hand_bundle, "2/res/0", method="top5_cosine")
    with pytest.raises(ValueError, match="pearson_tables"):
        build_flow_graph(hand_bundle, "2/res/0", method="top1_pearson")
    monkeypatch.setattr(hand_bundle, "is_approx", lambda site: "hook_z mapped through o_proj" if site == "attn" else "")
    g = build_flow_graph(hand_bundle, "2/res/0")
    att = [n for n in g.nodes if n.site == "attn"]
    assert att and all(n.approx for n in att) and not any(n.approx for n in g.nodes if n.site != "attn")
    assert any("attn matches use an approximation" in n for n in g.notes)


def test_cli_flow_method_option(hand_bundle, capsys):
    from steering.cli import main
    preset = str(hand_bundle.preset.root) + "/preset.json"
    assert main(["flow", "0/res/2", "--json", "--preset", preset, "--method", "permutation", "--t-res", "0.2",
                 "--direction", "forward"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "permutation" and (out["l_start"], out["l_end"]) == (0, 4)  # 0.3 link kept at t 0.2
    assert main(["flow", "0/res/2", "--preset", preset, "--method", "nearest"]) == 2
    assert "valid: top1_cosine, random_top5, permutation" in capsys.readouterr().err


def test_chance_levels_per_sae_follow_its_width(tiny_bundle):
    """The chance cosine of a match into each SAE: best of as many random unit directions in d dims."""
    from steering.flow import chance_levels, chance_top1

    levels = chance_levels(tiny_bundle)
    assert set(levels) == set(tiny_bundle.saes)
    for key, v in levels.items():
        expected = float(chance_top1(tiny_bundle.width(*key), tiny_bundle.d_model, 1000).median())
        assert v == pytest.approx(expected, abs=1e-3) and 0 < v < 1
