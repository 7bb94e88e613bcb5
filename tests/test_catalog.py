"""Feature catalog on a tiny bundle: contexts, stats, search, text lookup, round trip."""

import pytest
import torch

from steering import sites as S
from steering.catalog import Catalog, build, corpus_sequences, features_for_text


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory):
    cat = build(tiny_bundle, n_tokens=3000, ctx=32, batch=16, seed=0)
    root = tmp_path_factory.mktemp("cat")
    cat.save(root)
    return cat, Catalog.load(root)


def test_contexts_hold_the_max_token_and_stats_match_naive(tiny_bundle, built):
    cat, _ = built
    b = tiny_bundle
    seqs = corpus_sequences(b.tokenizer, 3000, 32, 0)
    store = {}
    mods = {(1, "res"): b.module(1, "res")}
    acts = []
    for i in range(0, len(seqs), 16):
        with S.capture_sites(mods, store):
            b.model.model(input_ids=seqs[i:i + 16])
        acts.append(b.encode(1, "res", store[(1, "res")][:, 1:].reshape(-1, b.d_model)))
    z = torch.cat(acts)  # [N, w]
    for f in range(0, 128, 17):
        card = cat.card(f"1/res/{f}")
        assert card.max_act == pytest.approx(float(z[:, f].max()), rel=1e-3, abs=1e-3)
        assert card.frequency == pytest.approx(float((z[:, f] > 0).float().mean()), rel=1e-3, abs=1e-5)
        if card.max_act > 0:
            top = card.contexts[0]
            assert top["act"] == pytest.approx(card.max_act, rel=1e-3, abs=1e-3)
            assert 0 <= top["index"] < len(top["tokens"])


def test_search_finds_features_by_their_top_tokens(built):
    cat, loaded = built
    from steering.catalog import _words
    f, row = next((i, r) for i, r in enumerate(cat.features[(2, "res")]) if r["top"] and _words(r["top"][0]))
    word = _words(row["top"][0])[0]
    hits = loaded.search(word, k=5000)
    assert f"2/res/{f}" in [h.feature for h in hits]
    assert all(word in h.matched for h in hits[:3])
    assert hits[0].score >= hits[-1].score
    assert all(h.feature.split("/")[1] == "res" for h in hits)
    with pytest.raises(ValueError, match="search query is empty"):
        loaded.search("   ")
    with pytest.raises(ValueError, match="too long"):
        loaded.search("x" * 1000)


def test_round_trip_and_labels(built):
    cat, loaded = built
    assert loaded.labels() == cat.labels()
    assert loaded.card("0/mlp/3").to_json() == cat.card("0/mlp/3").to_json()
    assert loaded.meta["label_source"] == "offline" and loaded.meta["tokens"] > 0
    with pytest.raises(ValueError, match="not in the catalog"):
        loaded.card("0/res/100000")


def test_features_for_text_agree_with_direct_encode(tiny_bundle):
    out = features_for_text(tiny_bundle, "The bride smiled at the wedding", k=5)
    assert len(out["per_token"]) == len(out["tokens"]) and out["per_token"][0] == []
    fid, act, t = out["top"][0]
    l, s, i = fid.split("/")
    store, _ = tiny_bundle.activations(["The bride smiled at the wedding"], [(int(l), s)])
    z = tiny_bundle.encode(int(l), s, store[(int(l), s)][0])
    assert float(z[t, int(i)]) == pytest.approx(act, rel=1e-3)
    with pytest.raises(ValueError, match="text is empty"):
        features_for_text(tiny_bundle, "")
