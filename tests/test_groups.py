"""Predecessor groups, deactivation (cheap evaluation == full forward), live activations."""

import pytest
import torch

from steering import sites as S
from steering.bundle import Bundle
from steering.features import FeatureId
from steering.flow import build_flow_graph, table
from steering.groups import (GROUPS, deactivate, encode_all, group_shares, live_activations,
                             predecessor_candidates, predecessor_groups)
from steering.synthetic import make_tiny_preset

TEXT = "The angry man shouted at the referee during the football match while the bride smiled"


@pytest.fixture(scope="module")
def tied_bundle(tmp_path_factory):
    """MLP features 0..63 of layer 1 copy residual features 0..63 of layer 1 (true predecessors)."""
    gen = torch.Generator().manual_seed(1)
    res1 = torch.nn.functional.normalize(torch.randn(128, 64, generator=gen), dim=-1)
    path = make_tiny_preset(tmp_path_factory.mktemp("tied"), decoders={(1, "res"): res1, (1, "mlp"): res1[:64].clone()})
    return Bundle.load(str(path), device="cpu")


def _full_forward_r1(bundle, ids, token, key, delta):
    def edit(h):
        h = h.clone()
        h[:, token] += delta
        return h
    store = {}
    with S.edit_sites({key: bundle.module(*key)}, {key: edit}), S.capture_sites({"r": bundle.module(1, "res")}, store):
        bundle.model(input_ids=ids)
    return store["r"][0, token]


def test_removing_the_true_predecessor_lowers_the_descendant(tied_bundle):
    b = tied_bundle
    cache = encode_all(b, TEXT)
    _, codes, ids = cache
    z_res, z_mlp = codes[(1, "res")], codes[(1, "mlp")]
    cases = [(t, f) for t in range(1, ids.shape[1]) for f in range(64) if z_res[t, f] > 0 and z_mlp[t, f] > 0]
    assert cases, "no token where a feature and its copy in the MLP are both active"
    changes_true, changes_unrelated = [], []
    for t, f in cases[:6]:
        true = deactivate(b, TEXT, t, FeatureId(1, "res", f), [FeatureId(1, "mlp", f)], r=0.0, cache=cache)
        changes_true.append(true.activation_change)
        others = [u for u in (z_mlp[t] > 0).nonzero().flatten().tolist() if u != f]
        cos = table(b, (1, "res"), (1, "mlp"))
        assert cos is not None
        dec = b.decoder(1, "mlp")
        u = min(others, key=lambda u: abs(float(dec[u] @ b.decoder(1, "res")[f])))
        changes_unrelated.append(deactivate(b, TEXT, t, FeatureId(1, "res", f), [FeatureId(1, "mlp", u)],
                                            cache=cache).activation_change)
    assert min(changes_true) > 0.05
    assert sum(changes_true) / len(changes_true) > 3 * max(abs(c) for c in changes_unrelated) + 0.02


@pytest.mark.parametrize("site_key", [(1, "mlp"), (0, "res")])
def test_cheap_evaluation_equals_full_forward(tied_bundle, site_key):
    b = tied_bundle
    cache = encode_all(b, TEXT)
    acts, codes, ids = cache
    t = 5
    p = int(codes[site_key][t].argmax())
    target = int(codes[(1, "res")][t].argmax())
    res = deactivate(b, TEXT, t, FeatureId(1, "res", target), [FeatureId(site_key[0], site_key[1], p)], r=-2.0,
                     cache=cache, compute_loss=True)
    delta = -3.0 * float(codes[site_key][t, p]) * b.sae(*site_key).W_dec[p]
    h_full = _full_forward_r1(b, ids, t, site_key, delta)
    z_full = float(b.encode(1, "res", h_full[None])[0, target])
    assert res.z_new == pytest.approx(z_full, rel=1e-4, abs=1e-4)
    assert res.loss_change is not None and res.loss_change != 0.0


def test_bad_deactivation_arguments(tied_bundle):
    with pytest.raises(ValueError, match="is not in R_0, M_1 or A_1"):
        deactivate(tied_bundle, TEXT, 3, "1/res/0", ["2/mlp/0"])
    with pytest.raises(ValueError, match="0 is the attention sink"):
        deactivate(tied_bundle, TEXT, 0, "1/res/0", ["1/mlp/0"])


def test_groups_match_a_direct_recount(tied_bundle):
    b = tied_bundle
    records = predecessor_groups(b, [TEXT, "Once upon a time a little girl found a cat"], tokens_per_text=3, seed=0)
    assert records and {r.group for r in records} <= set(GROUPS)
    _, codes, _ = encode_all(b, TEXT)
    for r in [r for r in records if r.text == 0 and r.layer == 1][:20]:
        mlp_pred = int(table(b, (1, "res"), (1, "mlp")).index[r.feature])
        assert ("MLP" in r.group) == bool(codes[(1, "mlp")][r.token, mlp_pred] > 0)
        assert codes[(1, "res")][r.token, r.feature] > 0
    assert all(r.s_res is None for r in records if r.layer == 0)  # no R_{-1}
    for shares in group_shares(records).values():
        assert sum(shares.values()) == pytest.approx(1.0)
    cands = predecessor_candidates(b, FeatureId(1, "res", records[0].feature), codes, records[0].token, "top5_cosine")
    assert all(codes[(c.layer, c.site)][records[0].token, c.index] > 0 for c in cands)


def test_live_activations_cover_every_node(tied_bundle):
    g = build_flow_graph(tied_bundle, "1/res/3")
    live = live_activations(tied_bundle, g, "The bride smiled")
    assert set(live["acts"]) == {str(n.id) for n in g.nodes}
    assert all(len(v) == len(live["tokens"]) for v in live["acts"].values())
