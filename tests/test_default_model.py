"""On the shipped default model + SAEs: steering a catalog feature with a clear theme raises that
feature on the generated tokens and moves the text toward the theme (offline judge), for at
least three themes (issue 6). Slow: loads the real model (~1.7 GB RSS) and generates on CPU."""

import pytest

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def default_bundle():
    from steering.bundle import Bundle
    return Bundle.load("default")


def test_default_bundle_loads_all_90_saes_within_budget(default_bundle):
    from pathlib import Path
    b = default_bundle
    assert len(b.saes) == 90 and b.width(12, "res") == 1024 and b.width(12, "mlp") == 384
    assets = Path(__file__).resolve().parent.parent / "assets"
    # assets/saes holds the v1 SAEs (preset default-v1), kept for one submission as the "before"
    # of docs/saes.md: deleting them in the same submission as adding v2 exceeds the submission's
    # diff limit. The budget is for what the default preset ships.
    legacy = assets / "saes"
    sizes = [p.stat().st_size for p in assets.rglob("*") if p.is_file() and legacy not in p.parents]
    assert sum(sizes) <= 200e6 and max(sizes) <= 50e6


def test_steering_shifts_text_toward_the_theme(default_bundle):
    """The curated activation examples (catalog features with a clear theme, assets/demo_examples.json),
    steered as the app's demo steers them (cumulative flow steering, exponential decay)."""
    from steering.catalog import Catalog
    from steering.flow import build_flow_graph
    from steering.generate import generate_variants
    from steering.judge import OfflineJudge
    from steering.steer import plan
    from steering.ui import load_demo_examples

    examples = [e for e in load_demo_examples(default_bundle) if e.task == "activate"]
    assert len(examples) >= 3
    cat = Catalog.load(default_bundle)
    judge = OfflineJudge()
    seeds = [0, 1, 2, 3]
    shifted, seen = [], []
    for ex in examples:
        assert cat.card(ex.feature).label  # a catalog feature
        graph = build_flow_graph(default_bundle, ex.feature)
        specs = plan(graph, ex.condition, ex.layer, ex.strength, "exp", ex.alpha)
        gens = generate_variants(default_bundle, "I think ", {"base": [], "steered": specs}, seeds=seeds,
                                 max_new_tokens=24)
        act = {v: sum(g.metrics["feature_activation"].get(ex.feature, 0.0) for g in gens if g.variant == v)
               / len(seeds) for v in ("base", "steered")}
        scores = judge.score([g.text for g in gens], ex.theme, "activate")
        beh = {v: sum(s.behavioral for g, s in zip(gens, scores) if g.variant == v) / len(seeds)
               for v in ("base", "steered")}
        seen.append((ex.title, ex.feature, act, beh))
        if act["steered"] > act["base"] and beh["steered"] > beh["base"]:
            shifted.append(ex.title)
    assert len(shifted) >= 3, seen


def test_gguf_conversion_equals_the_direct_gguf_load(tmp_path, monkeypatch):
    """The one-time conversion (tokenizer in a child process, memoized tensor-name map) gives the
    same tokenizer and logits as transformers loading the GGUF directly, and leaves no temp folder."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering.bundle import _gguf_converted, package_dir
    from steering.presets import get_preset

    monkeypatch.setenv("FFP_CACHE", str(tmp_path))
    preset = get_preset("default")
    original = gguf.get_tensor_name_map
    out = _gguf_converted(preset)
    assert gguf.get_tensor_name_map is original  # the memoization is undone
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= {p.name for p in out.iterdir()}

    src = package_dir(preset.gguf_package)
    ref_tok = AutoTokenizer.from_pretrained(src, gguf_file=preset.model)
    ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=preset.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = "The bride and groom cut the wedding cake. def f(x): return x ** 2"
    chat = [{"role": "user", "content": "hi"}]
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_gguf_name_map_memoization_is_scoped():
    import gguf

    from steering.bundle import _memoized_gguf_name_map

    original = gguf.get_tensor_name_map
    arch = gguf.MODEL_ARCH.LLAMA
    with pytest.raises(KeyError), _memoized_gguf_name_map():
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
        assert original(arch, 30).mapping == gguf.get_tensor_name_map(arch, 30).mapping
        raise KeyError("an error inside the conversion")
    assert gguf.get_tensor_name_map is original
