"""Generation (steering/generate.py): batched = one by one, per-row seeds, isolation after errors,
local quality signals, and the `steer` CLI."""

import json
import subprocess
import sys

import pytest
import torch

from steering import generate as G
from steering.cli import main
from steering.features import FeatureId
from steering.generate import PerRowSampler, generate_variants
from steering.metrics import distinct_n
from steering.sites import capture_sites, count_hooks
from steering.steer import SteerSpec

VARIANTS = {"base": [], "a": [SteerSpec(FeatureId(1, "res", 3), 6.0)],
            "b": [SteerSpec(FeatureId(0, "mlp", 2), -4.0), SteerSpec(FeatureId(2, "res", 9), 3.0)],
            "rm": [SteerSpec(FeatureId(1, "res", 5), -4.0, mode="rescale")]}


@pytest.mark.parametrize("temperature", [0.0, 1.27])
def test_batched_variants_equal_one_by_one(tiny_bundle, temperature):
    """Greedy (exact) and sampled with per-row generators: a row's tokens do not depend on its
    batch mates."""
    batched = generate_variants(tiny_bundle, "I think ", VARIANTS, seeds=[3, 4], max_new_tokens=8,
                                temperature=temperature, metrics=False)
    assert [(g.variant, g.seed) for g in batched] == [(v, s) for v in VARIANTS for s in (3, 4)]
    for g in batched:
        alone = generate_variants(tiny_bundle, "I think ", {g.variant: VARIANTS[g.variant]}, seeds=[g.seed],
                                  max_new_tokens=8, temperature=temperature, metrics=False)[0]
        assert alone.token_ids == g.token_ids, (temperature, g.variant, g.seed)
    ids = {(g.variant, g.seed): g.token_ids for g in batched}
    assert ids[("a", 3)] != ids[("base", 3)]
    if temperature > 0:
        assert ids[("base", 3)] != ids[("base", 4)]
    else:
        assert ids[("base", 3)] == ids[("base", 4)]
    assert count_hooks(tiny_bundle.model) == 0


def test_strength_zero_reproduces_baseline_and_seeds_differ(tiny_bundle):
    out = generate_variants(tiny_bundle, "I think ", {"base": [], "zero": [SteerSpec(FeatureId(1, "res", 3), 0.0)],
                                                       "r1": [SteerSpec(FeatureId(1, "res", 3), 1.0, mode="rescale")]},
                            seeds=[0, 1], max_new_tokens=10, metrics=False)
    by = {(g.variant, g.seed): g for g in out}
    for seed in (0, 1):
        assert by[("base", seed)].token_ids == by[("zero", seed)].token_ids == by[("r1", seed)].token_ids
        assert by[("base", seed)].text == by[("zero", seed)].text
    assert by[("base", 0)].token_ids != by[("base", 1)].token_ids


def test_exception_inside_generation_leaves_no_steering_behind(tiny_bundle, monkeypatch):
    b = tiny_bundle
    steered = {"a": [SteerSpec(FeatureId(1, "res", 3), 8.0), SteerSpec(FeatureId(0, "res", 4), 0.0, mode="rescale")]}
    before = generate_variants(b, "I think ", {"base": []}, seeds=[7], max_new_tokens=8, metrics=False)[0]
    real, calls = PerRowSampler.__call__, []

    def failing(self, input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            # two edit hooks + the cache-length pre-hook + one sink detector per layer, live mid-generation
            assert count_hooks(b.model) == 3 + b.n_layers
            raise RuntimeError("boom in step 3")
        return real(self, input_ids, scores)

    monkeypatch.setattr(PerRowSampler, "__call__", failing)
    with pytest.raises(RuntimeError, match="boom in step 3"):
        generate_variants(b, "I think ", steered, seeds=[7], max_new_tokens=8, metrics=False)
    monkeypatch.setattr(PerRowSampler, "__call__", real)
    assert count_hooks(b.model) == 0
    after = generate_variants(b, "I think ", {"base": []}, seeds=[7], max_new_tokens=8, metrics=False)[0]
    assert after.token_ids == before.token_ids
    # a successful steered request does not leak into the next one either
    generate_variants(b, "I think ", steered, seeds=[7], max_new_tokens=8, metrics=False)
    again = generate_variants(b, "I think ", {"base": []}, seeds=[7], max_new_tokens=8, metrics=False)[0]
    assert again.token_ids == before.token_ids and count_hooks(b.model) == 0


def test_bad_requests_fail_before_compute(tiny_bundle):
    b = tiny_bundle
    with pytest.raises(ValueError, match="max_new_tokens = 10000 is out of range; allowed: 1..128"):
        generate_variants(b, "I think ", {"a": []}, seeds=[0], max_new_tokens=10_000)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_variants(b, "  ", {"a": []}, seeds=[0])
    with pytest.raises(ValueError, match="prompt is 5000 tokens|prompt is too long"):
        generate_variants(b, "x" * 5000, {"a": []}, seeds=[0])
    with pytest.raises(ValueError, match="seeds is empty"):
        generate_variants(b, "I think ", {"a": []}, seeds=[])
    with pytest.raises(ValueError, match="top_p = 0 is out of range"):
        generate_variants(b, "I think ", {"a": []}, seeds=[0], top_p=0.0)
    with pytest.raises(ValueError, match="number of rows"):
        generate_variants(b, "I think ", {str(i): [] for i in range(40)}, seeds=[0])
    assert count_hooks(b.model) == 0


def test_per_row_sampler_top_p_and_independent_rows():
    torch.manual_seed(0)
    scores = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]] * 3)  # [batch, vocab]
    p = (scores[0] / 1.27).softmax(-1)
    assert p[0] < 0.7 < p[0] + p[1]  # the nucleus at top_p = 0.7 is {0, 1}
    drawn = set()
    for seed in range(40):
        out = PerRowSampler([torch.Generator().manual_seed(seed + 100 * i) for i in range(3)], 1.27, 0.7)(None, scores)
        assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == 3 * 4
        drawn |= set(out.argmax(-1).tolist())
    assert drawn == {0, 1}
    # row 1's draws depend only on its own generator, not on what the other rows hold
    many = torch.randn(3, 50)
    a = PerRowSampler([torch.Generator().manual_seed(s) for s in (1, 2, 3)], 1.0, 0.95)
    c = PerRowSampler([torch.Generator().manual_seed(2)], 1.0, 0.95)
    for _ in range(5):
        assert int(a(None, many).argmax(-1)[1]) == int(c(None, many[1:2]).argmax(-1)[0])


def test_distinct_n_by_hand():
    assert distinct_n([1, 2, 1, 2, 1], 1) == pytest.approx(2 / 5)
    assert distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
    assert distinct_n([1, 2, 3, 1, 2, 3], 3) == pytest.approx(3 / 4)
    assert distinct_n([1], 2) == 1.0


@pytest.mark.parametrize("metric_rows", [2, 4])
def test_local_metrics_match_a_per_text_reference(tiny_bundle, monkeypatch, metric_rows):
    """Per-text reference values, with the metrics forward run a few rows at a time (issue 20:
    the logits of every row at once were the app's memory peak): no forward sees more rows."""
    b = tiny_bundle
    monkeypatch.setattr(G, "METRIC_ROWS", metric_rows)
    seen = []
    handle = b.model.register_forward_pre_hook(lambda _m, args, kw: seen.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    feats = ["1/res/3", "0/mlp/2"]
    out = generate_variants(b, "I think ", {"base": [], "a": [SteerSpec(FeatureId(1, "res", 3), 6.0),
                                                              SteerSpec(FeatureId(0, "mlp", 2), 2.0)]},
                            seeds=[0, 5, 7], max_new_tokens=9)
    handle.remove()
    n_chunks = (len([g for g in out if g.token_ids]) + metric_rows - 1) // metric_rows
    metric_calls = seen[-n_chunks:]  # the metrics forwards come last
    assert max(metric_calls) <= metric_rows and len(seen) > len(metric_calls)
    prompt = b.tokenizer("I think ")["input_ids"]
    for g in out:
        m = g.metrics
        assert m["n_tokens"] == len(g.token_ids) and set(m["feature_activation"]) == set(feats)
        if not g.token_ids:
            continue
        ids = torch.tensor([prompt + g.token_ids])  # reference: one unsteered forward per text
        store = {}
        with capture_sites({(1, "res"): b.module(1, "res"), (0, "mlp"): b.module(0, "mlp")}, store):
            logits = b.model(input_ids=ids).logits[0].float()
        nll = -logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).mean()
        assert m["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-3)
        for name, key, idx in [("1/res/3", (1, "res"), 3), ("0/mlp/2", (0, "mlp"), 2)]:
            z = b.encode(*key, store[key][0, len(prompt):])[:, idx]
            assert m["feature_activation"][name] == pytest.approx(float(z.mean()), abs=1e-3)
            assert m["feature_active_tokens"][name] == int((z > 0).sum())  # 0 of n: fires on none of them
        for n in (1, 2, 3):
            assert m[f"distinct_{n}"] == pytest.approx(distinct_n(g.token_ids, n), abs=1e-3)


def test_chat_template_option(tiny_bundle):
    text = G.format_prompt(tiny_bundle, "hello", chat=True)
    assert "hello" in text and text != "hello"
    g = generate_variants(tiny_bundle, "hello", {"base": []}, seeds=[0], max_new_tokens=3, chat=True, metrics=False)
    assert len(g[0].token_ids) <= 3


def test_cli_steer_json(tiny_llama_preset):
    cmd = [sys.executable, "-m", "steering", "steer", "1/res/3", "--preset", str(tiny_llama_preset), "--condition",
           "cumulative", "--strength", "3", "--alpha", "-0.25", "--schedule", "exp", "--seed", "0",
           "--max-new-tokens", "6", "--json"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout)
    assert {"prompt", "unsteered", "steered", "schedule", "metrics"} <= set(out)
    assert out["prompt"] == "I think " and isinstance(out["steered"], str)
    assert out["schedule"] and all({"layer", "feature", "strength"} <= set(r) for r in out["schedule"])
    for r in out["schedule"]:
        assert r["strength"] == pytest.approx(3 * 2.718281828 ** (-0.25 * r["layer"]), rel=1e-5)
    assert {"perplexity", "distinct_2", "feature_activation"} <= set(out["metrics"]["steered"][0])


def test_cli_steer_remove_in_process(tiny_llama_preset, capsys):
    code = main(["steer", "1/res/3", "--preset", str(tiny_llama_preset), "--task", "remove", "--condition", "single",
                 "--r", "-2", "--samples", "2", "--max-new-tokens", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["prompt"].startswith("I think that the biggest problem")
    assert len(out["steered"]) == 2 and all(r["strength"] == -2.0 and r["mode"] == "rescale" for r in out["schedule"])


@pytest.mark.parametrize("extra, msg", [
    (["--strength", "nan"], "--strength must be finite, got nan; allowed: -200..200"),
    (["--strength", "1e9"], "--strength = 1e+09 is out of range; allowed: -200..200"),
    (["--alpha", "inf"], "--alpha must be finite"),
    (["--r", "-100"], "--r = -100 is out of range; allowed: -64..64"),
    (["--condition", "all"], "unknown --condition 'all'; valid: seed-only, single, cumulative"),
    (["--schedule", "cos"], "valid: exp, linear, constant"),
    (["--max-new-tokens", "100000"], "--max-new-tokens = 100000 is out of range; allowed: 1..128"),
    (["--samples", "0"], "--samples = 0 is out of range; allowed: 1..8"),
    (["--prompt", ""], "--prompt is empty"),
    (["--top-p", "1.5"], "--top-p = 1.5 is out of range"),
    (["--temperature", "-1"], "--temperature = -1 is out of range"),
])
def test_cli_steer_bad_values_exit_2(tiny_llama_preset, capsys, extra, msg):
    code = main(["steer", "1/res/3", "--preset", str(tiny_llama_preset)] + extra)
    assert code == 2 and msg in capsys.readouterr().err


def test_typed_special_tokens_stay_text(tiny_bundle):
    """A user cannot forge chat turns: typed markup is tokenised as characters (issue 18)."""
    tok = tiny_bundle.tokenizer
    special = [t for t in (tok.eos_token, tok.bos_token, tok.pad_token) if t]
    assert special, "the tiny tokenizer needs a special token for this test"
    typed = f"hello {special[0]} world"
    ids = G.encode_prompt(tiny_bundle, typed)
    assert tok.convert_tokens_to_ids(special[0]) not in ids
    assert tok.decode(ids) == typed


def test_instruction_goes_before_the_prompt(tiny_bundle):
    ids = G.encode_prompt(tiny_bundle, "I think ", instruction="Talk about food.")
    text = tiny_bundle.tokenizer.decode(ids)
    assert text.index("Talk about food.") < text.index("I think")


def test_cli_steer_controls_and_theme(tiny_llama_preset, capsys, monkeypatch):
    """--controls prompt,random adds both controls, one text per sample, and --theme scores every
    variant with the configured judge (offline here: no key, no base URL)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    code = main(["steer", "1/res/3", "--preset", str(tiny_llama_preset), "--condition", "single", "--samples", "2",
                 "--max-new-tokens", "4", "--controls", "prompt,random", "--theme", "anger", "--t-res", "0.2",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["controls"]) == {"prompted", "random"}
    assert all(len(v) == 2 for v in out["controls"].values())
    assert set(out["scores"]) == {"unsteered", "baseline", "steered", "random", "prompted"}  # baseline: deprecated
    assert out["scores"]["baseline"] == out["scores"]["unsteered"]
    assert out["judge"].startswith("offline") and out["flow"]["t_res"] == 0.2


def test_cli_old_names_still_work_for_a_release(tiny_llama_preset, capsys, caplog, monkeypatch):
    """--mode (now --condition), the condition "baseline" (now "seed-only") and the output keys
    "baseline" (now "unsteered") and "mode" (now "condition") work for one more release, with a
    warning for the inputs (the condition's once per process: start afresh)."""
    from steering import settings

    monkeypatch.setattr(settings, "_warned", set())
    code = main(["steer", "1/res/3", "--preset", str(tiny_llama_preset), "--mode", "baseline",
                 "--max-new-tokens", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["condition"] == out["mode"] == "seed-only"
    assert out["baseline"] == out["unsteered"] and out["metrics"]["baseline"] == out["metrics"]["unsteered"]
    assert [r["feature"] for r in out["schedule"]] == ["1/res/3"]
    assert set(out["deprecated_keys"]) == {"baseline", "mode"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "--mode is deprecated" in warned and "'baseline' is deprecated" in warned


def test_cli_prompt_control_needs_a_theme(tiny_llama_preset, capsys):
    code = main(["steer", "1/res/3", "--preset", str(tiny_llama_preset), "--controls", "prompt"])
    assert code == 2 and "--theme" in capsys.readouterr().err


def test_random_control_matches_norms_not_directions(tiny_bundle):
    from steering.controls import random_control
    from steering.steer import SteerSpec, _deltas

    specs = [SteerSpec(FeatureId(1, "res", 3), 4.0), SteerSpec(FeatureId(0, "mlp", 2), 2.0)]
    real, rand = _deltas(tiny_bundle, [specs]), _deltas(tiny_bundle, [random_control(tiny_bundle, specs)])
    assert set(real) == set(rand)
    for k in real:
        torch.testing.assert_close(real[k].norm(), rand[k].norm(), rtol=1e-4, atol=1e-4)
        cos = torch.nn.functional.cosine_similarity(real[k].flatten(), rand[k].flatten(), dim=0)
        assert abs(float(cos)) < 0.9
    removal = [SteerSpec(FeatureId(1, "res", 3), 0.0, "rescale")]
    ctrl = random_control(tiny_bundle, removal)[0]
    assert ctrl.feature.layer == 1 and ctrl.feature.site == "res" and ctrl.feature.index != 3


def test_cli_seed_set_merges_the_graphs(tiny_llama_preset, capsys):
    code = main(["steer", "1/res/3,2/res/5", "--preset", str(tiny_llama_preset), "--task", "remove", "--condition",
                 "cumulative", "--t-res", "0", "--max-new-tokens", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["seed"] for g in out["flow"]["graphs"]] == ["1/res/3", "2/res/5"]
    feats = [r["feature"] for r in out["schedule"]]
    assert len(feats) == len(set(feats)) and {"1/res/3", "2/res/5"} <= set(feats)
