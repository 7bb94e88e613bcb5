"""Attention sinks are found by residual norm, not only by index."""

import torch

from steering.sinks import sink_mask


def test_first_token_and_high_norm_positions_are_sinks():
    h = torch.randn(2, 6, 8)
    h[1, 2] *= 100  # a second sink in row 1
    m = sink_mask(h)
    assert m[:, 0].all()
    assert m[1, 2] and m.sum() == 3


def test_padding_is_never_a_sink_and_first_real_token_is():
    h = torch.randn(1, 5, 4)
    h[0, 0] *= 1000  # a huge pad position (left padding)
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    m = sink_mask(h, mask)
    assert m.tolist() == [[False, True, False, False, False]]


def test_stacked_layers_any_layer_marks_a_sink():
    h = torch.randn(3, 1, 6, 4)
    h[2, 0, 4] *= 100
    assert sink_mask(h)[0, 4]
    assert not sink_mask(h[:2])[0, 4]


def test_add_mode_leaves_a_norm_sink_untouched(tiny_bundle):
    """A position the residual norm marks as a sink in the prompt is not steered."""
    from steering.features import FeatureId
    from steering.sites import capture_sites
    from steering.steer import SteerSpec, steering

    b = tiny_bundle
    enc = b.tokenize(["The angry man shouted loudly"])
    mods = {(1, "res"): b.module(1, "res"), (0, "res"): b.module(0, "res")}

    def run(rows, bump):
        store: dict = {}

        def boost(_m, _i, out):  # make position 2 a sink at layer 0's residual stream
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            if bump and h.shape[1] > 2:
                h[:, 2] *= 1000
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = b.module(0, "res").register_forward_hook(boost)
        try:
            with steering(b, rows, enc["attention_mask"]), capture_sites(mods, store):
                b.model(**enc)
        finally:
            handle.remove()
        return store

    f = FeatureId(1, "res", 3)
    clean, steered = run([[]], True), run([[SteerSpec(f, 4.0)]], True)
    assert torch.allclose(steered[(1, "res")][0, 2], clean[(1, "res")][0, 2])  # the sink
    assert not torch.allclose(steered[(1, "res")][0, 3], clean[(1, "res")][0, 3])


def test_what_people_read_skips_massive_activation_tokens_too(tiny_bundle, monkeypatch):
    """A position at 5-10x the median norm is not a sink for training (SINK_RATIO) but is left out of
    what people read: the catalog's statistics and "Which features fire?" (DISPLAY_SINK_RATIO)."""
    from steering import probe, sinks
    from steering.catalog import build

    h = torch.ones(1, 6, 4)
    h[0, 3] *= 7.0  # a massive-activation token, like SmolLM2's " the" at 5-10x
    assert sink_mask(h).tolist() == [[True, False, False, False, False, False]]
    assert sink_mask(h, ratio=sinks.DISPLAY_SINK_RATIO)[0].tolist() == [True, False, False, True, False, False]
    seen = []

    def spy(*a, **k):
        seen.append(k.get("ratio", sinks.SINK_RATIO))
        return sink_mask(*a, **k)

    for mod in (probe, build):
        monkeypatch.setattr(mod, "sink_mask", spy)
    probe.features_for_text(tiny_bundle, "The bride and groom cut the cake.")
    build.build_catalog(tiny_bundle, n_tokens=256, ctx=32, batch=8, texts={"prose": ["a b c d e f g h " * 40]})
    assert seen and set(seen) == {sinks.DISPLAY_SINK_RATIO}
