"""On the shipped default model + SAEs: the bundle loads within the asset budget, and the curated
demo examples claim only what the demo sweep measured (issue 17). Slow: loads the real model
(~1.7 GB RSS) and generates on CPU."""

import pytest

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def default_bundle():
    from steering.bundle import Bundle
    return Bundle.load("default")


def test_default_bundle_loads_all_90_saes_within_budget(default_bundle):
    from pathlib import Path
    b = default_bundle
    assert len(b.saes) == 90 and b.width(12, "res") == 1024 and b.width(12, "mlp") == 1024 and b.width(12, "attn") == 384
    assets = Path(__file__).resolve().parent.parent / "assets"
    sizes = [p.stat().st_size for p in assets.rglob("*") if p.is_file()]
    assert sum(sizes) <= 200e6 and max(sizes) <= 50e6


PREFIX_TOKENS = 12  # every replayed demo text must start with the recorded text's first tokens


def test_curated_examples_claim_only_what_the_sweep_measured(default_bundle):
    """Every curated example of the default preset comes from the demo sweep's evidence
    (results/default/demo/sweep.json): its feature and setting are the sweep's choice for that
    theme, the hit counts its explanation quotes are the recorded ones, and rerunning the chosen
    setting's batch (its 8 first seeds) reproduces the recorded texts (the evidence is real; up to
    float differences between CPUs late in a text, see below)."""
    import json
    import re
    from pathlib import Path

    from steering import limits
    from steering.experiments import demo_sweep as D
    from steering.generate import generate_variants
    from steering.settings import DEPRECATED_CONDITIONS
    from steering.ui import load_demo_examples

    root = Path(__file__).resolve().parent.parent
    sweep = json.loads((root / "results" / "default" / "demo" / "sweep.json").read_text())
    themes = {t["title"]: t for t in sweep["themes"]}
    examples = load_demo_examples(default_bundle)
    assert examples, "the default preset has curated examples"
    for ex in examples:
        rec = themes[ex.title]
        chosen = rec["chosen"]
        cond, s = chosen["setting"].split(":")
        # the sweep records the old condition name ("baseline"); the example file the current one
        assert (ex.feature, ex.condition) == (chosen["feature"], DEPRECATED_CONDITIONS.get(cond, cond))
        assert (ex.strength if ex.task == "activate" else ex.r) == float(s)
        quoted = [int(n) for n in re.findall(r"(\d+) of 8", ex.explanation)]
        conf = rec["confirm"]  # the fresh-seed check is quoted first, and a shown example held there
        assert quoted[:2] == [conf["steered"]["hits"], conf["unsteered"]["hits"]], ex.explanation
        assert conf["steered"]["hits"] > conf["unsteered"]["hits"]
        assert quoted[2:4] == [chosen["hits"], rec["baseline_hits"]], ex.explanation  # then the choosing seeds'
        assert ex.samples <= 8 and ex.seed == conf["seeds"][0]  # a click shows fresh samples
        # replay the sweep's batch that held the chosen setting (same rows, same seeds); the
        # candidate's runs are recorded in the order of the grid it was swept with (a seed set:
        # SET_GRID), and D.plan_for plans a seed set as the app does
        names = list(rec["candidates"][ex.feature]["runs"])
        per = max(1, limits.MAX_ROWS // len(D.SEEDS))
        i = names.index(chosen["setting"]) // per * per
        chunk = {n: D.plan_for(default_bundle, ex.feature, n, ex.task) for n in names[i:i + per]}
        n_tok = 36 if ex.task == "activate" else 64
        gens = generate_variants(default_bundle, rec["prompt"], chunk, D.SEEDS, n_tok, metrics=False)
        samples = rec["candidates"][ex.feature]["runs"][chosen["setting"]]["samples"]
        recorded = [r["text"] for r in samples]
        got = [g.text for g in gens if g.variant == chosen["setting"]]
        # Exact on the machine that recorded them; on another CPU (session 13: AMD EPYC against the
        # recording machine) float kernels can tip one sampled token at T = 1.27 late in a text and
        # everything after it (Weddings: one of 8 texts from token 18 on, with the SAEs it was
        # recorded with). Evidence made up or produced by other settings would differ from the first
        # tokens on, so: every text starts as recorded, and at least 6 of 8 are identical.
        assert len(got) == len(recorded)
        for a, w in zip(got, recorded):
            ta, tw = (default_bundle.tokenizer(t)["input_ids"][:PREFIX_TOKENS] for t in (a, w))
            assert ta == tw, (ex.title, a, w)
        assert sum(a == w for a, w in zip(got, recorded)) >= 6, (ex.title, got, recorded)
        # and the claim holds on the reproduced texts alone (a text that diverged counts as a miss)
        backed = sum(r["hit"] for r, a in zip(samples, got) if a == r["text"])
        assert backed > rec["baseline_hits"], (ex.title, backed, rec["baseline_hits"])


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
