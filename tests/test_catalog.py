"""Feature catalog on the tiny bundle: contexts and stats against a naive recomputation, search
ranking, features of a text against a direct SAE encode, LLM labels with a fake client, round trip."""

import json
from types import SimpleNamespace

import pytest
import torch

from steering.catalog import Catalog, build_catalog, context_windows, corpus_sequences, offline_label
from steering.catalog import build as C
from steering.catalog import words as W
from steering.presets import SITES
from steering.probe import features_for_text

TEXTS = {
    "prose": ["The bride and the groom danced at the wedding while the guests cheered and the band played. "
              "After the ceremony everyone ate cake and the families celebrated the marriage late into the night.",
              "The recipe needs flour, sugar, eggs and butter. Mix the flour with sugar, then bake the cake for "
              "forty minutes until it is golden and smells of warm butter."] * 3,
    "code": ["def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
             "    def pop(self):\n        return self.items.pop()\n"] * 4,
    "math": ["Let G be a group and H a subgroup of G. The order of H divides the order of G, so 12 = 3 * 4 "
             "and 60 = 5 * 12 are possible orders of subgroups of a group of order 360."] * 4,
    "stories": ["Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
                "nothing to do: once or twice she had peeped into the book her sister was reading."] * 4,
}
N_TOKENS, CTX, BATCH = 2000, 32, 8


class FakeLLM:
    """Stands in for openai.OpenAI: labels every feature, except one batch it answers with bad JSON."""

    def __init__(self, special: dict[str, str]):
        self.special, self.calls = special, 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, **kw):
        self.calls += 1
        items = json.loads(messages[-1]["content"])
        if any(it["id"] == "0/res/0" for it in items):
            content = "not json"
        else:
            content = json.dumps({"labels": {it["id"]: self.special.get(it["id"], f"pattern {it['id']}")
                                             for it in items}})
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content))])


def fake_embed(words):
    """Unit vectors, random per word (512-d: unrelated words have |cos| < 0.3), except that
    'nuptials' gets the vector of 'wedding'."""
    out = []
    for w in words:
        g = torch.Generator().manual_seed(sum(ord(c) * 31 ** i for i, c in enumerate("wedding" if w == "nuptials" else w))
                                          % 2**31)
        v = torch.randn(512, generator=g)
        out.append(v / v.norm())
    return torch.stack(out)


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory):
    llm = FakeLLM({"2/res/7": "wedding bells and vows", "1/res/2": "cake, flour, push, self, bake and butter"})
    cat = build_catalog(tiny_bundle, n_tokens=N_TOKENS, ctx=CTX, batch=BATCH, seed=3, texts=TEXTS,
                      llm_client=llm, llm_sites=("res",), embed=fake_embed, query_vocab=["nuptials", "zzz"])
    root = tmp_path_factory.mktemp("catalog")
    sizes = cat.save(root)
    return cat, Catalog.load(root), root, sizes, llm


def _naive(bundle, layer, site):
    """Activations of every token of the same sequences, one feature column each.  # [n, ctx, w]"""
    seqs = corpus_sequences(bundle.tokenizer, N_TOKENS, CTX, 3, TEXTS).ids
    store, _ = bundle.activations({"input_ids": seqs, "attention_mask": torch.ones_like(seqs)}, [(layer, site)])
    return seqs, bundle.encode(layer, site, store[(layer, site)])


@pytest.mark.parametrize("key", [(1, "res"), (2, "mlp")])
def test_contexts_hold_the_max_token_and_stats_match_naive(tiny_bundle, built, key):
    cat, *_ = built
    seqs, z = _naive(tiny_bundle, *key)
    z = z[:, 1:]  # position 0 is not counted  # [n, ctx - 1, w]
    strings = W.token_strings(tiny_bundle.tokenizer, seqs.flatten().tolist())
    flat = z.reshape(-1, z.shape[-1])  # [N, w]
    n_ctx = C.N_CONTEXTS[key[1]]
    for f in range(flat.shape[1]):
        card = cat.card(f"{key[0]}/{key[1]}/{f}")
        col = flat[:, f]
        active = col > 0
        assert card.max_act == pytest.approx(float(col.max()), abs=2e-3)
        assert card.frequency == pytest.approx(float(active.float().mean()), rel=1e-3, abs=1e-6)
        mean = float(col[active].mean()) if active.any() else 0.0
        assert card.mean_act == pytest.approx(mean, rel=1e-3, abs=2e-3)
        # contexts: the per-sequence maxima, strongest first, one per sequence
        per_seq = z[:, :, f].max(dim=1).values  # [n]
        want = per_seq[per_seq > 0].sort(descending=True).values[:n_ctx]
        assert [c["act"] for c in card.contexts] == pytest.approx(want.tolist(), abs=2e-3)
        for c in card.contexts:
            # the highlighted token is where the sequence's max is, and the window is the text around it
            cand = ((per_seq - c["act"]).abs() < 2e-3).nonzero().flatten().tolist()
            hits = [(s, int(z[s, :, f].argmax()) + 1) for s in cand]
            assert hits, f"no sequence with max activation {c['act']} for feature {f}"
            ok = False
            for s, p in hits:
                lo = p - c["index"]
                window = [strings[int(t)] for t in seqs[s, lo:lo + len(c["tokens"])]]
                ok |= lo >= 0 and window == c["tokens"] and c["tokens"][c["index"]] == strings[int(seqs[s, p])]
            assert ok, f"context {c} of feature {f} is not the text around its max token"
        if card.top_tokens:  # top tokens: summed activation among the top token activations
            a, j = col.topk(C.N_TOP_ACTS)
            ids = seqs[:, 1:].reshape(-1)[j]
            mass = {}
            for v, t in zip(a.tolist(), ids.tolist()):
                if v > 0:
                    mass[strings[t]] = mass.get(strings[t], 0.0) + v
            best = max(mass.values())
            assert mass[card.top_tokens[0]] == pytest.approx(best, rel=1e-4)


def test_context_windows_stop_at_document_boundaries():
    eos = 99
    seqs = torch.tensor([[1, 2, eos, 3, 4, 5, 6, eos, 7, 8]])
    ids, keep = context_windows(seqs, torch.tensor([[0, 0]]), torch.tensor([[5, 7]]), [eos], window=(4, 3))
    shown = [[int(t) for t, k in zip(ids[0, i], keep[0, i]) if k] for i in range(2)]
    assert shown == [[3, 4, 5, 6], [3, 4, 5, 6, eos]]  # an EOS centre keeps the text it ends


def test_offline_labels_follow_the_rule(built):
    label = offline_label([(" wedding", 0.6), (" bride", 0.3)], ["ceremony", "wedding", "guests", "cake"],
                          [" marriage", "x", " bride"], ["prose"])
    assert label == "wedding, bride · ctx: ceremony, guests, cake → marriage [prose]"
    assert offline_label([], [], [], []) == "(never fired)"
    cat, loaded, *_ = built
    card = loaded.card("1/mlp/3")
    assert card.label_source == "offline"
    common = W.common_promoted(loaded.summary, "mlp")
    out = [t for t in card.promoted_tokens if not set(W.text_words(t)) & common]
    assert card.label == offline_label(list(zip(card.top_tokens, card.top_token_shares)), card.context_words,
                                       out, card.tags)
    # a promoted word shared by many features is left out of labels
    summary = {(0, "res"): {"out": [[" strugg", " cat"]] * 20 + [[" dog"]] * 5}}
    assert W.common_promoted(summary, "res") == {"strugg", "cat"}


def test_llm_labels_with_fallback_for_failed_batches(built):
    cat, loaded, _, _, llm = built
    assert llm.calls >= 2
    assert loaded.label("2/res/7") == "wedding bells and vows"
    assert loaded.card("2/res/7").label_source == "llm"
    assert loaded.card("0/res/0").label_source == "offline"  # its batch failed
    assert loaded.meta["label_source"] == "mixed" and loaded.meta["llm_labels"] > 0


def test_promoted_tokens_are_the_logit_lens(tiny_bundle, built):
    cat, *_ = built
    m = tiny_bundle.model
    d = tiny_bundle.decoder(1, "res")[5]  # [d_model]
    logits = m.lm_head(m.model.norm(d[None, None]))[0, 0]  # lm_head(final_norm(d_f))
    want = W.token_strings(tiny_bundle.tokenizer, logits.topk(C.N_PROMOTED).indices.tolist())
    top = logits.topk(C.N_PROMOTED).indices.tolist()
    assert cat.card("1/res/5").promoted_tokens == [want[t] for t in top]


def test_search_finds_features_by_top_tokens_and_ranks_label_matches_first(built):
    cat, loaded, *_ = built
    # a word that is some res feature's top token
    fid, word = next((f"{l}/res/{i}", W.text_words(t)[0]) for (l, s), cols in sorted(cat.summary.items()) if s == "res"
                     for i, top in enumerate(cols["top"]) for t, _ in top if W.text_words(t))
    hits = loaded.search(word, k=10_000)
    assert fid in [h.feature for h in hits]
    assert all(h.feature.split("/")[1] == "res" for h in hits)
    # label match first; hits sorted by the score they show (strong fields count double)
    hits = loaded.search("wedding", k=10_000, sites=("res", "mlp", "attn"))
    fields = lambda h: {m.field for m in h.matched}  # noqa: E731
    assert hits[0].feature == "2/res/7" and "label" in fields(hits[0])
    assert hits[0].reasons()[0].startswith("wedding (") and "label" in hits[0].reasons()[0]
    word = next(w for w in ("cake", "flour", "push", "self", "bake", "butter") if any(
        "context" in fields(h) and "top" not in fields(h) for h in loaded.search(w, k=10_000, sites=SITES)))
    hits = loaded.search(word, k=10_000, sites=SITES)
    assert hits[0].feature == "1/res/2" and "label" in fields(hits[0])
    strong = [bool(fields(h) & {"label", "top", "tag"}) for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and not all(strong)
    assert loaded.search("weddings")[0].feature == "2/res/7"  # stemmed
    assert not any(m.word == "wed" for h in loaded.search("wed", k=10_000) for m in h.matched)
    # multi-word: matching both words beats matching one
    both = loaded.search("wedding vows", k=3)
    assert both[0].feature == "2/res/7" and {m.word for m in both[0].matched} == {"wedding", "vows"}
    assert len(both[0].reasons()) == 2 and both[0].to_json()["matched"] == both[0].reasons()
    # layer filter and feature ids
    assert all(h.feature.startswith("1/") for h in loaded.search(word, layers=[1], k=10_000))
    assert loaded.search("2/res/7")[0].feature == "2/res/7"


def test_search_and_text_validation(tiny_bundle, built):
    _, loaded, *_ = built
    with pytest.raises(ValueError, match="search query is empty"):
        loaded.search("   ")
    with pytest.raises(ValueError, match="too long"):
        loaded.search("x" * 1000)
    with pytest.raises(ValueError, match="no searchable words"):
        loaded.search("the of")
    with pytest.raises(ValueError, match="unknown sites"):
        loaded.search("cake", sites=("resid",))
    with pytest.raises(ValueError, match="text is empty"):
        features_for_text(tiny_bundle, "")
    with pytest.raises(ValueError, match="too long"):
        features_for_text(tiny_bundle, "word " * 2000)
    with pytest.raises(ValueError, match="not in the catalog"):
        loaded.card("0/res/100000")
    assert loaded.label("0/res/100000") == "" and loaded.label("garbage") == ""


def test_features_for_text_agree_with_direct_encode(tiny_bundle):
    text = "The bride smiled at the wedding"
    out = features_for_text(tiny_bundle, text, k=5, sites=("res", "mlp"))
    keys = [k for k in sorted(tiny_bundle.saes) if k[1] in ("res", "mlp")]
    store, _ = tiny_bundle.activations([text], keys)
    # activations in units of each feature's typical activation (its reference scale)
    z = {k: tiny_bundle.encode(*k, store[k][0]) / tiny_bundle.ref_scale(*k).clamp_min(1e-6) for k in keys}
    assert len(out["per_token"]) == len(out["tokens"]) and out["per_token"][0] == []
    for t in range(1, len(out["tokens"])):
        flat = sorted(((float(z[k][t, i]), f"{k[0]}/{k[1]}/{i}") for k in keys for i in range(z[k].shape[1])),
                      reverse=True)[:5]
        assert [a for a, _ in flat if a > 0] == pytest.approx([a for _, a in out["per_token"][t]], abs=1e-3)
        for fid, act in out["per_token"][t]:
            l, s, i = fid.split("/")
            assert float(z[(int(l), s)][t, int(i)]) == pytest.approx(act, abs=1e-3)
    fid, act, t = out["top"][0]
    best = max(float(z[k][1:].max()) for k in keys)
    l, s, i = fid.split("/")
    assert act == pytest.approx(best, abs=1e-3) and float(z[(int(l), s)][t, int(i)]) == pytest.approx(act, abs=1e-3)
    assert "".join(out["tokens"]) == text


def test_round_trip_and_size_bookkeeping(tiny_bundle, built):
    cat, loaded, root, sizes, _ = built
    fresh = Catalog.load(root)  # reads labels and stats only; details and contexts on first use
    assert "top" not in fresh.summary[(0, "res")] and not fresh._contexts
    assert fresh.card("0/res/1").to_json() == cat.card("0/res/1").to_json() and "top" in fresh.summary[(0, "res")]
    assert loaded.labels() == cat.labels() and len(loaded.labels()) == sum(
        tiny_bundle.width(*k) for k in tiny_bundle.saes)
    for fid in ("0/mlp/3", "2/res/7", "1/attn/10"):
        assert loaded.card(fid).to_json() == cat.card(fid).to_json()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gz"))
    assert files == sorted(sizes) == sorted(loaded.meta["files"])
    assert all((root / f).stat().st_size == loaded.meta["files"][f] for f in files)
    assert loaded.meta["total_bytes"] == sum(sizes.values())
    assert loaded.meta["tokens"] == sum(loaded.meta["tokens_per_domain"].values())
    assert set(loaded.meta["tokens_per_domain"]) == set(TEXTS)
    loaded.check_bundle(tiny_bundle)
    sae = tiny_bundle.sae(1, "res")
    orig = sae.W_dec.detach().clone()
    try:
        with torch.no_grad():  # one decoder row of one SAE changed (a revived latent): refused
            sae.W_dec[-1] = torch.roll(orig[-1], 1)
        with pytest.raises(ValueError, match="other SAE weights"):
            loaded.check_bundle(tiny_bundle)
        with torch.no_grad():  # the same SAE stored in bf16: still the catalog's
            sae.W_dec.copy_(orig.to(torch.bfloat16).float())
        loaded.check_bundle(tiny_bundle)
    finally:
        with torch.no_grad():
            sae.W_dec.copy_(orig)
    loaded.check_bundle(tiny_bundle)


def test_corpus_sequences_mix_domains_and_are_seeded(tiny_bundle):
    tok = tiny_bundle.tokenizer
    texts = {"big": ["alpha beta gamma delta " * 40] * 200, "small": ["tiny text here"]}
    a = corpus_sequences(tok, 3000, 32, 0, texts)
    assert a.ids.shape[1] == 32 and sum(a.tokens_per_domain.values()) == len(a.ids) * 31
    assert a.docs_per_domain["small"] == 1 and a.tokens_per_domain["big"] > 2000  # the big one fills in
    assert torch.equal(a.ids, corpus_sequences(tok, 3000, 32, 0, texts).ids)
    real = corpus_sequences(tok, 4000, 32, 0)  # the installed corpora (scripts/install_corpora.sh)
    # the installed corpora; "everyday" where its texts were generated or its snapshot is committed
    # (steering.training.everyday)
    assert {"prose", "stories", "math", "code"} <= set(real.domains) <= {"prose", "stories", "math", "code", "everyday"}
    assert real.tokens_per_domain["prose"] > 2 * real.tokens_per_domain["math"]  # MIX: prose 0.4, math 0.1
    assert len(set(real.domain[:20].tolist())) > 1  # shuffled across domains


def test_cli_search_and_show(built, tiny_llama_preset, capsys):
    from steering import cli

    _, loaded, root, *_ = built
    assert cli.main(["catalog", "search", "wedding", "--out", str(root), "--preset", str(tiny_llama_preset),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hits"][0]["feature"] == "2/res/7"
    assert cli.main(["catalog", "show", "1/mlp/3", "--out", str(root), "--preset", str(tiny_llama_preset)]) == 0
    assert cli.main(["catalog", "search", "", "--out", str(root), "--preset", str(tiny_llama_preset)]) == 2


def test_related_words_expand_queries(built):
    cat, loaded, *_ = built
    assert loaded.related() == cat.related() and "wedding" in dict(loaded.related()["nuptials"])
    assert "zzz" not in loaded.related()  # nothing similar to it
    hits = loaded.search("nuptials", k=10_000, sites=SITES)
    assert hits[0].feature == "2/res/7" and ("nuptials", "wedding") in {(m.word, m.related) for m in hits[0].matched}
    assert "≈wedding" in hits[0].reasons()[0]
    exact = {h.feature: h.score for h in loaded.search("wedding", k=10_000, sites=SITES)}
    for h in hits:  # an expanded match scores RELATED_WEIGHT x similarity of the exact one
        assert h.score == pytest.approx(W.RELATED_WEIGHT * 1.0 * exact[h.feature], rel=1e-3, abs=1e-3)
    words = W.related_words(["bride", "cake", "wedding"], ["nuptials"], fake_embed, min_sim=0.5)
    assert words == {"nuptials": [("wedding", 1.0)]}


def test_refresh_rederives_the_same_labels_and_related_words(built, tmp_path):
    cat, _, root, *_ = built
    again = Catalog.load(root)
    again.derive(embed=fake_embed, query_vocab=["nuptials", "zzz"])
    assert again.labels() == cat.labels() and again.related() == cat.related()
    again.save(tmp_path)
    assert Catalog.load(tmp_path).labels() == cat.labels()


def test_theme_words_keep_whole_words_only():
    from steering.catalog import theme_words

    assert theme_words([" marriage", " the", " bank", " jury", " Bible"]) == ["marriage", "bank", "jury", "Bible"]
    assert theme_words([" food", " dish", "erve", " food", " eat", "(", "K", " 42"]) == ["food", "dish", "eat"]
    assert theme_words(["\n", "0", " a"]) == []
    assert theme_words([" physics", " chemistry", " science", " mechanics", " energy"], n=2) == ["physics", "chemistry"]


def test_readable_labels_use_whole_words_and_name_form_features():
    """Issue 17: a lay label has whole words only (no word pieces, no logit-lens tokens); a feature
    that fires on punctuation or function words is said to, and `function_share` measures it."""
    from steering.catalog.labels import FUNCTION_SHARE, function_share, readable_label

    cake = [(" cake", 0.4), (" co", 0.2), (" cakes", 0.1), ("uled", 0.1)]
    assert readable_label(cake, ["chocolate", "pan", "180"], []) == "cake, cakes (in texts with chocolate, pan)"
    assert function_share(cake) < FUNCTION_SHARE
    small = [(" ", 0.2), (" is", 0.1), (" had", 0.1), ("Ver", 0.05)]
    assert function_share(small) >= FUNCTION_SHARE and readable_label(small, [], []) == "small words (is, had)"
    punct = [(",", 0.6), (" ", 0.2), (" faith", 0.04)]
    assert readable_label(punct, [], ["punctuation"]) == "punctuation"
    assert readable_label([("self", 0.5)], ["def", "repr"], ["code"]) == "texts with def, repr in code"
    assert readable_label([(" God", 0.3), (" moon", 0.2), (" Moon", 0.1)], [], []) == "God, moon"


def test_form_features_say_what_they_push_toward():
    """Walkthrough (session 14): the Music example's 27/res/402 carded as "small words (a, of, in)
    ... its label names no theme" while the Demo steered music with it. A form feature's lay label
    now adds the whole words its direction makes the model say (logit lens) and the content words
    among its top tokens; word pieces, stop words, words outside the vocabulary and words common
    to many features stay out."""
    from steering.catalog.labels import lens_words, readable_label

    vocab = frozenset({"melodies", "melody", "tuning", "athlete", "since", "time", "banana"})
    promoted = [" melodies", "ution", " melody", " Melody", "athlete", " the", " tuning"]
    assert lens_words(promoted, vocab) == ["melodies", "melody"]
    assert lens_words(promoted, vocab, n=3) == ["melodies", "melody", "tuning"]  # 'athlete': no leading space
    assert lens_words(promoted, vocab, common={"melodies"}) == ["melody", "tuning"]
    assert lens_words([" athlet", " fog"], vocab | {"fog"}) == []  # a piece; under 4 letters
    assert lens_words(promoted, frozenset()) == []
    small = [(" of", 0.3), (" in", 0.3), (" from", 0.3), (",", 0.1)]
    assert readable_label(small, [], [], ["melodies", "melody"]) == "small words (of, in, from), pushing toward melodies, melody"
    olympic = [(" Olympic", 0.2), (" in", 0.3), (" the", 0.3), (" as", 0.2)]
    assert readable_label(olympic, [], [], ["athlete"]) == "Olympic and small words (in, the, as), pushing toward athlete"
    assert readable_label(olympic, [], ["code"], ["athlete"]) == "Olympic and small words (in, the, as) in code, pushing toward athlete"
    cake = [(" cake", 0.4), (" cakes", 0.1)]
    assert readable_label(cake, [], [], ["banana"]) == "cake, cakes"  # a content feature is named by what it reads
    assert readable_label([(",", 0.6), (" ", 0.2)], [], ["punctuation"], ["time"]) == "punctuation, pushing toward time"


def test_catalog_lens_words_only_in_late_layers(built, monkeypatch):
    """`Catalog.lens_words` reads the logit lens from LENS_MIN_DEPTH of the depth on (it means
    little in early layers); the lay label and card use it, the raw label is unchanged."""
    import steering.catalog.store as store

    _, loaded, *_ = built
    monkeypatch.setattr(store, "_vocab", lambda: frozenset({"zebra", "walrus"}))
    top_layer = max(l for l, s in loaded.summary if s == "res")
    loaded._detailed("res")
    cols_lo, cols_hi = loaded.summary[(0, "res")], loaded.summary[(top_layer, "res")]
    saved = cols_lo["out"][0], cols_hi["out"][0]
    try:
        cols_lo["out"][0] = cols_hi["out"][0] = [" zebra", " walrus"]
        assert loaded.lens_words(f"{top_layer}/res/0") == ["zebra", "walrus"]
        assert loaded.lens_words("0/res/0") == []
    finally:
        cols_lo["out"][0], cols_hi["out"][0] = saved


def test_the_card_says_why_a_form_feature_can_steer():
    """The card's note for a label naming no theme gives the words the direction pushes toward."""
    from steering.ui import _no_theme_note

    with_lens, without = _no_theme_note(["melodies", "melody"]), _no_theme_note([])
    assert "pushes the model toward melodies, melody" in with_lens and "steering adds" in with_lens
    assert "pushes" not in without and "Theme for the judge" in without and "Theme for the judge" in with_lens


def test_catalog_plain_labels_and_form_features(built):
    _, loaded, *_ = built
    for fid in ("0/res/1", "2/res/7", "1/res/3"):
        plain = loaded.plain_label(fid)
        assert plain and "→" not in plain and "ctx:" not in plain
    assert loaded.plain_label("garbage") == ""
    flags = loaded.function_features(0, "res")
    assert len(flags) == len(loaded.summary[(0, "res")]["label"]) and any(flags) and not all(flags)
    assert loaded.function_features(99, "res") == []
    # a dense feature (active on more than DENSE_FREQ of the tokens) counts as form, whatever it fires on
    from steering.catalog.store import DENSE_FREQ

    cols = loaded.summary[(0, "res")]
    i = flags.index(False)
    kept = cols["freq"][i]
    try:
        cols["freq"][i] = DENSE_FREQ + 0.01
        assert loaded.function_features(0, "res")[i]
    finally:
        cols["freq"][i] = kept
    assert not loaded.function_features(0, "res")[i]


def test_text_probe_hides_form_features_and_sinks_unless_asked(tiny_bundle):
    """Issue 17: the probe leaves out features a `hide` flags and attention sinks by default."""
    text = "The bride smiled at the wedding"
    everything = features_for_text(tiny_bundle, text, k=5, keep_sinks=True)
    assert everything["per_token"][0]  # the sink shows when asked for
    shown = features_for_text(tiny_bundle, text, k=5)
    assert shown["per_token"][0] == []
    layer = int(shown["top"][0][0].split("/")[0])
    hidden = features_for_text(tiny_bundle, text, k=5,
                               hide=lambda l, s: [l == layer] * tiny_bundle.width(l, s))
    assert hidden["top"] and all(not f.startswith(f"{layer}/") for f, _, _ in hidden["top"])
    assert all(not f.startswith(f"{layer}/") for row in hidden["per_token"] for f, _ in row)


def test_token_pieces_rebuild_characters_split_over_tokens(tiny_bundle):
    """Issue 17: byte-level pieces of one character are shown together, never as '\ufffd'."""
    tok = tiny_bundle.tokenizer
    text = "the café 🎂 cake"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tiny tokenizer splits these characters
    pieces = W.token_pieces(tok, ids)
    assert "".join(p for p, _ in pieces) == text and not any("\ufffd" in p for p, _ in pieces)
    assert [i for _, pos in pieces for i in pos] == list(range(len(ids)))
    assert "🎂" in [p.strip() for p, _ in pieces]
    out = features_for_text(tiny_bundle, text, k=3)
    assert "".join(p for p, _ in out["pieces"]) == text


def test_weak_search_results_are_said_plainly(built):
    """Issue 17: results only through a related word or a rare top token are flagged as no good match."""
    from steering.catalog.search import GOOD_SCORE
    from steering.ui import Playground

    _, loaded, *_ = built
    hits = loaded.search("wedding", k=10_000)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    note = Playground.search_note("anger", [GOOD_SCORE - 0.5, 0.3])
    assert note.startswith("**No good match for “anger”**")
    assert Playground.search_note("wedding", [GOOD_SCORE + 1, 0.3]) == "" == Playground.search_note("x", [])


def test_labels_show_whitespace_tokens_as_symbols_and_leave_out_partial_characters():
    """Issue 17: catalog labels had "'\\n'" and '\ufffd' in them."""
    top = [("\ufffd", 0.4), ("\\n", 0.3), (" wedding", 0.2), (" \ufffd", 0.1)]
    label = offline_label(top, [], [], [])
    assert label == "⏎, wedding"
    assert "\ufffd" not in label and "\\n" not in label
    assert W.show_token("  ") == "␣␣" and W.show_token("\\n\\n") == "⏎⏎"


def test_judge_theme_comes_from_the_readable_label_never_raw_pieces():
    """Walkthrough: the judge theme of 27/res/402 read "a, in, the → tuning, melody" (the raw label,
    logit lens included). It is now the readable label's words, or "" for a feature that fires on
    small words (the person types the theme)."""
    from steering.catalog.labels import judge_theme, readable_label
    from steering.catalog.store import FeatureCard
    from steering.ui import card_theme

    small = [(" a", 0.3), (" in", 0.3), (" the", 0.3), (",", 0.1)]
    assert readable_label(small, [], []).startswith("small words") and judge_theme(small, []) == ""
    music = [(" music", 0.4), (" art", 0.3), ("ogon", 0.2), (" the", 0.1)]
    assert judge_theme(music, ["album"]) == "music, art"  # whole words only: no piece, no stop word
    assert judge_theme([("gap", 0.6), ("ulp", 0.4)], ["gap", "math"]) == "gap, math"  # no word: the contexts'
    card = FeatureCard("27/res/402", "a, in, the → tuning, melody", "offline", [], {}, [t for t, _ in small],
                       [s for _, s in small], ["tuning", "melody"])
    assert card_theme(card) == ""
    assert card_theme(FeatureCard("1/res/2", "wedding vows", "llm", [], {}, [" a"], [1.0], [])) == "wedding vows"


def test_shipped_catalog_is_not_dominated_by_one_context():
    """The default catalog's top contexts are spread over the text: no single window is the top
    context of more than 3% of a layer's residual features. A looping generated text (" tomorrow"
    x40: 1,419 features labelled "tomorrow", up to 5.5% of a layer) or a massive-activation token
    left in (one partial sink: 5.8% at layers 12-19) breaks this; the session-14 build's worst is 1.7%."""
    import collections
    import gzip
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "assets" / "catalog" / "contexts"
    files = sorted(root.glob("res_*.json.gz"))
    assert len(files) == 30
    for f in files:
        tops = [tuple(e[0][0]) for e in json.loads(gzip.open(f).read()) if e]
        window, n = collections.Counter(tops).most_common(1)[0]
        assert n / len(tops) <= 0.03, (f.name, "".join(window), n)


def test_search_reasons_in_plain_words():
    """The search table's last column says why a feature matched in plain words (the walkthrough
    read "music (context, top, top ≈musical)" and "promoted ≈melodies" as jargon)."""
    from steering.catalog.search import Match
    from steering.ui import plain_matches

    assert plain_matches([Match("music", "context"), Match("music", "top"), Match("music", "top", "musical")]) == \
        "music: in its texts, fires on it, fires on “musical”"
    assert plain_matches([Match("tune", "promoted", "melodies"), Match("song", "label"), Match("song", "tag")]) == \
        "tune: pushes toward “melodies”; song: in its label, its tag"
    assert plain_matches([Match("2/res/7", "id")]) == "feature id"
