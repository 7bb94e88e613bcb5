"""Predecessor groups, deactivation (cheap evaluation == full forward), the Table 1 protocol, Pearson
tables and live activations, on tiny models with known predecessors."""

import pytest
import torch

from steering import sites as S
from steering.bundle import Bundle
from steering.features import FeatureId
from steering.flow import build_flow_graph, neighbour_pairs, pearson_match, pearson_tables, table
from steering.groups import (GROUPS, SINGLE_GROUPS, codes_after, deactivate, deactivation_check, encode_all,
                             group_scores, group_shares, live_activations, loss_change_after, predecessor_groups)
from steering.synthetic import make_tiny_preset

TEXT = "The angry man shouted at the referee during the football match while the bride smiled"
TEXTS = [TEXT, "Once upon a time a little girl found a cat in the garden", "def add ( a , b ) : return a + b"]


@pytest.fixture(scope="module")
def tied_bundle(tmp_path_factory):
    """MLP features 0..63 of layer 1 copy residual features 0..63 of layer 1 (true predecessors):
    the synthetic SAEs have W_enc = W_dec^T, so each target's encoder direction is exactly its
    predecessor's decoder direction."""
    gen = torch.Generator().manual_seed(1)
    res1 = torch.nn.functional.normalize(torch.randn(128, 64, generator=gen), dim=-1)
    path = make_tiny_preset(tmp_path_factory.mktemp("tied"), decoders={(1, "res"): res1, (1, "mlp"): res1[:64].clone()})
    return Bundle.load(str(path), device="cpu")


def _full_forward(bundle, ids, token, key, delta):
    """Reference: the whole model rerun with delta added at ``key``, token ``token``.
    Returns R_1 at the token and the logits."""
    def edit(h):
        h = h.clone()
        h[:, token] += delta
        return h
    store = {}
    with S.edit_sites({key: bundle.module(*key)}, {key: edit}), S.capture_sites({"r": bundle.module(1, "res")}, store):
        logits = bundle.model(input_ids=ids).logits
    return store["r"][0, token], logits[0]


def test_removing_the_true_predecessor_lowers_the_descendant(tied_bundle):
    b = tied_bundle
    tc = encode_all(b, TEXT)
    z_res, z_mlp = tc.codes[(1, "res")], tc.codes[(1, "mlp")]
    cases = [(t, f) for t in range(1, tc.ids.shape[1]) for f in range(64) if z_res[t, f] > 0 and z_mlp[t, f] > 0]
    assert cases, "no token where a feature and its copy in the MLP are both active"
    changes_true, changes_unrelated = [], []
    for t, f in cases[:6]:
        true = deactivate(b, TEXT, t, FeatureId(1, "res", f), [FeatureId(1, "mlp", f)], r=0.0, cache=tc)
        assert true.z_old == pytest.approx(float(z_res[t, f]))
        changes_true.append(true.activation_change)
        others = [u for u in (z_mlp[t] > 0).nonzero().flatten().tolist() if u != f]
        dec = b.decoder(1, "mlp")
        u = min(others, key=lambda u: abs(float(dec[u] @ b.decoder(1, "res")[f])))  # the least related active one
        changes_unrelated.append(deactivate(b, TEXT, t, FeatureId(1, "res", f), [FeatureId(1, "mlp", u)],
                                            cache=tc).activation_change)
    assert min(changes_true) > 0.05
    assert sum(changes_true) / len(changes_true) > 3 * max(abs(c) for c in changes_unrelated) + 0.02


@pytest.mark.parametrize("site_key", [(1, "mlp"), (1, "attn"), (0, "res")])
def test_cheap_evaluation_equals_full_forward(tied_bundle, site_key):
    b = tied_bundle
    tc = encode_all(b, TEXT)
    t = 5
    p = int(tc.codes[site_key][t].argmax())
    target = int(tc.codes[(1, "res")][t].argmax())
    res = deactivate(b, TEXT, t, FeatureId(1, "res", target), [FeatureId(site_key[0], site_key[1], p)], r=-2.0,
                     cache=tc, compute_loss=True)
    delta = -3.0 * float(tc.codes[site_key][t, p]) * b.sae(*site_key).W_dec[p]
    h_full, logits = _full_forward(b, tc.ids, t, site_key, delta)
    z_full = float(b.encode(1, "res", h_full[None])[0, target])
    assert res.z_new == pytest.approx(z_full, rel=1e-4, abs=1e-4)
    assert res.activation_change == pytest.approx(1 - z_full / res.z_old, rel=1e-3, abs=1e-4)
    # loss change: mean next-token loss over positions t.. (the ones the edit can reach)
    ce = torch.nn.functional.cross_entropy(logits[:-1], tc.ids[0, 1:], reduction="none")
    base = float(tc.token_loss[t:].mean())
    assert res.loss_change == pytest.approx((float(ce[t:].mean()) - base) / base, rel=1e-3, abs=1e-5)
    assert res.loss_change != 0.0


@pytest.mark.parametrize("site_key", [(1, "attn"), (0, "res")])
def test_cheap_evaluation_equals_full_forward_gemma2(tiny_gemma_bundle, site_key):
    """Gemma 2: A_l is post_attention_layernorm's output, sliding-window KV cache, eager attention."""
    b = tiny_gemma_bundle
    tc = encode_all(b, TEXT)
    t = 9
    p = int(tc.codes[site_key][t].argmax())
    z = codes_after(b, tc, t, 1, [(FeatureId(site_key[0], site_key[1], p),)], r=0.0)[0]
    delta = -float(tc.codes[site_key][t, p]) * b.sae(*site_key).W_dec[p]
    h_full, _ = _full_forward(b, tc.ids, t, site_key, delta)
    assert torch.allclose(z, b.encode(1, "res", h_full[None])[0], atol=1e-4)
    assert not torch.allclose(z, tc.codes[(1, "res")][t], atol=1e-3)  # the edit did change R_1


def test_batched_edit_sets_equal_one_at_a_time(tied_bundle):
    b = tied_bundle
    tc = encode_all(b, TEXT)
    t = 7
    r_prev = [FeatureId(0, "res", i) for i in (tc.codes[(0, "res")][t] > 0).nonzero().flatten().tolist()[:3]]
    mlp = [FeatureId(1, "mlp", i) for i in (tc.codes[(1, "mlp")][t] > 0).nonzero().flatten().tolist()[:2]]
    sets = [(r_prev[0],), (mlp[0],), (r_prev[1], mlp[1]), (r_prev[0], r_prev[2]), tuple(mlp)]
    z = codes_after(b, tc, t, 1, sets, r=0.0)  # [5, d_sae]
    for i, es in enumerate(sets):
        one = codes_after(b, tc, t, 1, [es], r=0.0)[0]
        assert torch.allclose(z[i], one, atol=1e-4), es
    losses = loss_change_after(b, tc, t, sets)
    assert losses[0] == pytest.approx(loss_change_after(b, tc, t, [sets[0]])[0], rel=1e-4, abs=1e-6)
    assert loss_change_after(b, tc, tc.ids.shape[1] - 1, sets[:1]) == [None]  # nothing after the last token
    assert S.count_hooks(b.model) == 0  # every rerun removed its hooks (also the ones stopped by _Stop)


def test_bad_deactivation_arguments(tied_bundle):
    with pytest.raises(ValueError, match="is not in R_0, M_1 or A_1"):
        deactivate(tied_bundle, TEXT, 3, "1/res/0", ["2/mlp/0"])
    with pytest.raises(ValueError, match="0 is the attention sink"):
        deactivate(tied_bundle, TEXT, 0, "1/res/0", ["1/mlp/0"])
    with pytest.raises(ValueError, match="residual features"):
        deactivate(tied_bundle, TEXT, 3, "1/mlp/0", ["1/mlp/1"])
    with pytest.raises(ValueError, match="valid: top1_cosine"):
        deactivation_check(tied_bundle, TEXTS[:1], layers=(1,), methods=("best",))


def test_deactivation_protocol(tied_bundle):
    b = tied_bundle
    methods = ("top1_cosine", "top5_cosine", "random_top5", "permutation", "exhaustive")
    rep = deactivation_check(b, TEXTS, layers=(1, 2), tokens_per_text=3, max_targets=6, methods=methods,
                             compute_loss=True, seed=0)
    assert rep.cases and set(rep.summary) == set(methods)
    assert {c.group for c in rep.cases} <= set(SINGLE_GROUPS)
    by = {(c.text, c.token, c.target, c.method): c for c in rep.cases}
    for (ti, t, tgt, m), c in list(by.items())[:40]:
        assert c.z_old > 0 and c.activation_change == pytest.approx(1 - c.z_new / c.z_old)
        if m == "top1_cosine":  # the single active top-1 predecessor of a single-predecessor group
            assert len(c.predecessors) == 1
        if m == "exhaustive":  # the best single predecessor is at least as good as top-1 cosine
            top1 = by.get((ti, t, tgt, "top1_cosine"))
            assert top1 is None or c.z_new <= top1.z_new + 1e-5
    # the exhaustive choice really is the best single active predecessor (brute force on one case)
    c = next(c for c in rep.cases if c.method == "exhaustive")
    tc = encode_all(b, TEXTS[c.text])
    tgt = FeatureId(*[int(x) if x.isdigit() else x for x in c.target.split("/")])
    best = min(deactivate(b, "", c.token, tgt, [FeatureId(tgt.layer + dl, s, i)], cache=tc).z_new
               for s, dl in (("res", -1), ("mlp", 0), ("attn", 0))
               for i in (tc.codes[(tgt.layer + dl, s)][c.token] > 0).nonzero().flatten().tolist())
    assert c.z_new == pytest.approx(best, abs=1e-4)
    for m, s in rep.summary.items():
        cs = [c for c in rep.cases if c.method == m]
        assert s.n_with_predecessor == len(cs) <= s.n_cases
        assert s.success_rate == pytest.approx(sum(c.deactivated for c in cs) / len(cs))
        assert s.loss_change is not None
    assert rep.summary["exhaustive"].activation_change >= rep.summary["top1_cosine"].activation_change - 1e-6
    assert rep.to_json()["summary"]["top1_cosine"]["n_cases"] == rep.summary["top1_cosine"].n_cases


def test_groups_match_a_direct_recount(tied_bundle):
    b = tied_bundle
    records = predecessor_groups(b, TEXTS[:2], tokens_per_text=3, seed=0)
    assert records and {r.group for r in records} <= set(GROUPS)
    tc = encode_all(b, TEXT)
    mlp_t, res_t, att_t = (table(b, (1, "res"), k) for k in ((1, "mlp"), (0, "res"), (1, "attn")))
    checked = 0
    for r in [r for r in records if r.text == 0 and r.layer == 1]:
        flags = [bool(tc.codes[k][r.token, int(m.index[r.feature])] > 0)
                 for k, m in (((0, "res"), res_t), ((1, "mlp"), mlp_t), ((1, "attn"), att_t))]
        expected = "+".join(n for n, on in zip(("RES", "MLP", "ATT"), flags) if on) or "From nowhere"
        assert r.group == expected and tc.codes[(1, "res")][r.token, r.feature] > 0
        assert r.s_mlp == pytest.approx(float(mlp_t.cosine[r.feature]))
        checked += 1
    assert checked > 10
    # every active feature at every sampled token is classified exactly once
    toks = sorted({r.token for r in records if r.text == 0})
    assert sum(1 for r in records if r.text == 0 and r.layer == 1) == int((tc.codes[(1, "res")][toks] > 0).sum())
    assert all(r.s_res is None for r in records if r.layer == 0)  # no R_{-1}
    assert all(r.token > 0 for r in records)  # never the attention sink
    for shares in group_shares(records).values():
        assert sum(shares.values()) == pytest.approx(1.0)
    scores = group_scores(records)
    assert sum(len(v["s_mlp"]) for v in scores.values()) == len(records)
    assert sum(len(v["s_res"]) for v in scores.values()) == sum(r.layer > 0 for r in records)
    # the tied MLP copies give cases whose top-1 MLP predecessor is the same direction (score 1)
    assert max(scores["MLP"]["s_mlp"] + scores["RES+MLP"]["s_mlp"] + scores["MLP+ATT"]["s_mlp"]
               + scores["RES+MLP+ATT"]["s_mlp"]) == pytest.approx(1.0, abs=1e-4)


def test_pearson_tables_equal_correlation_of_codes(tied_bundle):
    b = tied_bundle
    got = pearson_tables(b, TEXTS, layers=[1], max_tokens=10_000)
    assert set(got) == {((1, "res"), (0, "res")), ((1, "res"), (1, "mlp")), ((1, "res"), (1, "attn")),
                        ((1, "res"), (2, "res"))}
    with pytest.raises(ValueError, match="call steering.flow.pearson_tables"):  # layer 0 was not computed
        build_flow_graph(b, "1/res/3", method="top1_pearson", direction="backward")
    assert set(pearson_tables(b, TEXTS)) == set(neighbour_pairs(b.saes))  # every pair of the 3 layers
    tcs = [encode_all(b, t) for t in TEXTS]
    acts = {k: torch.cat([tc.codes[k][1:] for tc in tcs]) for k in ((1, "res"), (1, "mlp"))}  # skip position 0
    ref = pearson_match(acts[(1, "res")], acts[(1, "mlp")])
    m = table(b, (1, "res"), (1, "mlp"), "top1_pearson")
    assert torch.allclose(m.cosine, ref.cosine, atol=1e-2)  # fp16 storage of the codes
    agree = (m.index == ref.index).float().mean()
    assert agree > 0.95
    g = build_flow_graph(b, "1/res/3", method="top1_pearson", direction="backward")
    assert g.method == "top1_pearson" and g.node("1/res/3").s_mlp == pytest.approx(float(m.cosine[3]))
    with pytest.raises(ValueError, match="no residual SAE"):
        pearson_tables(b, TEXTS, layers=[7])


def test_live_activations_cover_every_node(tied_bundle):
    g = build_flow_graph(tied_bundle, "1/res/3")
    live = live_activations(tied_bundle, g, "The bride smiled")
    assert set(live["acts"]) == {str(n.id) for n in g.nodes} and live["skipped"] == []
    assert all(len(v) == len(live["tokens"]) for v in live["acts"].values())
    tc = encode_all(tied_bundle, "The bride smiled")
    for n in g.nodes:
        assert live["acts"][str(n.id)] == pytest.approx(tc.codes[(n.layer, n.site)][:, n.id.index].tolist(), abs=1e-3)
    assert "".join(live["tokens"]) == "The bride smiled"


def test_chance_shares_of_random_matches():
    """The chance row of §5.1: independent random matches, each active with p = k / width. The
    shares sum to 1, a site left out (layer 0 has no RES) never appears, and a case is RES-only
    with p_R (1 - p_M)(1 - p_A)."""
    from steering.groups import GROUPS, chance_shares

    p = {"RES": 64 / 1024, "MLP": 64 / 1024, "ATT": 48 / 384}
    got = chance_shares(p)
    assert list(got) == list(GROUPS) and abs(sum(got.values()) - 1) < 1e-12
    assert abs(got["RES"] - p["RES"] * (1 - p["MLP"]) * (1 - p["ATT"])) < 1e-12
    assert abs(got["RES+MLP+ATT"] - p["RES"] * p["MLP"] * p["ATT"]) < 1e-12
    first = chance_shares({"MLP": 0.5, "ATT": 0.5})
    assert first["RES"] == first["RES+MLP"] == 0.0 and first["From nowhere"] == 0.25
