"""Cross-layer alignment checks (issue 16) and the demo sweep's hit rules."""

import math

import pytest
import torch

from steering.experiments import demo_sweep as D
from steering.training import alignment as A
from steering.training import everyday


def test_chance_top1_matches_the_extreme_value_estimate():
    c = A.chance_top1(1536, 576, n_src=500)
    assert abs(float(c.median()) - math.sqrt(2 * math.log(1536) / 576)) < 0.03
    assert float(c.quantile(0.99)) > float(c.median())


def test_transfer_fve_identity_equals_reconstruction_and_random_map_is_worse():
    torch.manual_seed(0)
    dec = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    codes = torch.relu(torch.randn(400, 64)) * (torch.rand(400, 64) < 0.1)
    b = torch.randn(16)
    x = codes @ dec + b
    same = A.transfer_fve(codes, dec, dec, b, torch.arange(64), x)
    assert same > 0.999
    perm = A.transfer_fve(codes, dec, dec[torch.randperm(64)], b, torch.randint(0, 64, (64,)), x)
    assert perm < 0.5


def test_report_on_a_tiny_bundle_has_every_layer_and_chance(tiny_bundle):
    rep = A.report(tiny_bundle, tokens_per_domain=64, span_seeds=3, domains=("prose", "code"))
    assert set(rep["layers"]) == set(tiny_bundle.layers)
    row = rep["layers"][1]
    assert 0 <= row["s_res"]["share_ge_t_res"] <= 1 and row["s_res"]["chance_p99"] > row["s_res"]["chance_median"]
    assert row["span"]["n"] >= 1 and "transfer_fve" in row and set(row["fve"]["res"]) == {"prose", "code"}
    assert "| 1 |" in A.markdown(rep) and rep["summary"]["median_span"] >= 1


def test_everyday_texts_come_from_the_snapshot_where_the_cache_has_none(tmp_path):
    """A committed snapshot stands in for a missing cache file and seeds a longer run - only one
    made with the same seed (its prompts match); enough tokens there means no model is loaded."""
    import gzip
    import json

    rows = [{"i": i, "prompt": everyday.prompt_for(i), "text": f"text number {i} " * 10, "n_tokens": 40}
            for i in range(3)]
    snap = tmp_path / "snap.jsonl.gz"
    snap.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows[::-1]).encode()))
    cache = tmp_path / "cache" / "everyday.jsonl"
    assert everyday.load_docs(cache, snapshot=snap) == [r["text"] for r in rows]  # in prompt order
    with pytest.raises(FileNotFoundError, match="steering.training.everyday"):
        everyday.load_docs(cache, snapshot=None)
    everyday.generate(0, path=cache, seed=1, snapshot=snap)  # another seed's run: the snapshot is not its own
    assert not cache.exists()
    assert everyday.generate(120, path=cache, seed=0, snapshot=snap) == cache  # 3 x 40 tokens: done
    assert everyday.read_rows(cache) == rows


def test_everyday_prompts_are_seeded_and_independent_of_order():
    assert everyday.prompt_for(7, seed=0) == everyday.prompt_for(7, seed=0)
    assert len({everyday.prompt_for(i) for i in range(50)}) > 40


def test_demo_hit_rules():
    words = set(D.THEMES["Weddings"]["words"].split())
    assert D.theme_hits("The Bride smiled; the wedding was lovely.", words) == ["bride", "wedding"]
    assert D.readable({"perplexity": 40.0, "distinct_2": 0.9})
    assert not D.readable({"perplexity": 400.0, "distinct_2": 0.9})
    assert not D.readable({"perplexity": None, "distinct_2": 0.9})
    rec = {"candidates": {"5/res/1": {"span": [3, 9], "runs": {"single:8": {"hits": 6}, "single:16": {"hits": 6}}},
                          "7/res/2": {"span": [7, 7], "runs": {"baseline:8": {"hits": 7}}}}}
    # the wider span wins over one more hit on a one-layer graph; ties go to the weaker push
    assert D.choose(rec)[:2] == ("5/res/1", "single:8")
    # a feature whose label names the theme wins over one that hit more often by chance
    rec["words"] = sorted(words)
    rec["candidates"]["9/res/4"] = {"span": [2, 9], "label": "bride, cake · ctx: vows", "runs": {"single:4": {"hits": 2}}}
    assert D.choose(rec)[:2] == ("9/res/4", "single:4")
    assert D.on_theme("Bride, the, 9", words) and not D.on_theme("file, command", words)
    # the choice is made on the 24 seeds where a setting was rechecked: 8 + 3 beats 7 + 1
    def checked(hits: int, seeds=D.RECHECK_SEEDS) -> dict:
        return {"recheck_hits": hits, "recheck_samples": [{"seed": s, "hit": i < hits} for i, s in enumerate(seeds)]}

    rec["candidates"]["9/res/4"]["runs"] = {"single:4": {"hits": 8, **checked(1)},
                                            "single:8": {"hits": 7, **checked(3)},
                                            "single:6": {"hits": 8}}
    assert D.choose(rec)[:2] == ("9/res/4", "single:8")
    assert [r[1] for r in D.ranked(rec, stage="first")[:2]] == ["single:4", "single:6"]
    # a recheck on fewer seeds than the rules' (an older record) does not count until completed
    rec["candidates"]["9/res/4"]["runs"]["single:8"].update(checked(8, D.RECHECK_SEEDS[:8]))
    assert D.choose(rec)[:2] == ("9/res/4", "single:4")


def test_recheck_generates_only_the_seeds_a_record_lacks(monkeypatch):
    """A recorded sweep whose recheck had fewer seeds (session 16: seeds 8-15) is completed, not
    redone: only the missing seeds are generated, the recorded samples are kept, and the hits
    count all of RECHECK_SEEDS."""
    import steering.generate as G

    asked = []

    def fake(bundle, prompt, variants, seeds, max_new_tokens, **kw):
        asked.append((list(variants), list(seeds)))
        return [G.Generation(name, s, "a wedding" if s % 2 else "nothing", [], {"perplexity": 10.0})
                for name in variants for s in seeds]

    monkeypatch.setattr(G, "generate_variants", fake)
    monkeypatch.setattr(D, "plan_for", lambda *a: [])
    old = [{"seed": s, "text": "kept", "hit": True} for s in D.RECHECK_SEEDS[:8]]
    rec = {"task": "activate", "prompt": "I think", "words": ["wedding"], "candidates": {
        "9/res/4": {"label": "wedding", "span": [2, 9], "runs": {
            "single:4": {"hits": 5, "recheck_hits": 8, "recheck_samples": old}, "single:8": {"hits": 4}}}}}
    D.recheck(None, rec, 4)
    runs = rec["candidates"]["9/res/4"]["runs"]
    assert asked == [(["single:4"], D.RECHECK_SEEDS[8:]), (["single:8"], D.RECHECK_SEEDS)]
    assert [x["seed"] for x in runs["single:4"]["recheck_samples"]] == D.RECHECK_SEEDS
    assert runs["single:4"]["recheck_samples"][:8] == old  # recorded samples kept as they were
    assert runs["single:4"]["recheck_hits"] == 8 + sum(s % 2 for s in D.RECHECK_SEEDS[8:])
    assert D.rechecked(runs["single:8"]) and runs["single:8"]["recheck_hits"] == sum(s % 2 for s in D.RECHECK_SEEDS)
    D.recheck(None, rec, 4)  # complete: nothing more is generated
    assert len(asked) == 2


def test_demo_sweep_runs_end_to_end_on_a_tiny_preset(tiny_llama_preset, tmp_path, capsys):
    import json

    code = D.main(["--preset", str(tiny_llama_preset), "--out", str(tmp_path / "ev"), "--examples",
                   str(tmp_path / "ex.json"), "--themes", "Food", "--max-new-tokens", "4"])
    assert code == 0
    sweep = json.loads((tmp_path / "ev" / "sweep.json").read_text())
    food = sweep["themes"][0]
    assert food["title"] == "Food" and len(food["unsteered"]) == 8 and food["candidates"]
    for fid, c in food["candidates"].items():
        grid = D.SET_GRID if D.is_seed_set(fid) else D.GRID
        assert set(c["runs"]) == {f"{cond}:{s:g}" for cond, s in grid}
        assert all(len(r["samples"]) == 8 for r in c["runs"].values())
    assert {"prompted", "random"} == set(food["controls"])
    # the best first-stage settings ran again on 8 more seeds, and the choice is one of them
    rechecked = [(f, n) for f, c in food["candidates"].items() for n, r in c["runs"].items() if "recheck_hits" in r]
    assert 1 <= len(rechecked) <= D.N_RECHECK
    assert (food["chosen"]["feature"], food["chosen"]["setting"]) in rechecked
    for f, n in rechecked:
        run = food["candidates"][f]["runs"][n]
        assert [x["seed"] for x in run["recheck_samples"]] == D.RECHECK_SEEDS
        assert run["recheck_hits"] == sum(x["hit"] for x in run["recheck_samples"])
    assert not set(D.RECHECK_SEEDS) & (set(D.SEEDS) | set(D.CONFIRM_SEEDS))
    conf = food["confirm"]  # the chosen setting again on fresh seeds, beside the unsteered model
    assert conf["seeds"] == D.CONFIRM_SEEDS and not set(conf["seeds"]) & set(D.SEEDS)
    assert (conf["feature"], conf["setting"]) == (food["chosen"]["feature"], food["chosen"]["setting"])
    assert [x["seed"] for x in conf["steered"]["samples"]] == D.CONFIRM_SEEDS
    assert conf["steered"]["hits"] == sum(x["hit"] for x in conf["steered"]["samples"])
    assert not food["shipped"] or conf["steered"]["hits"] >= D.MIN_HITS
    ex = json.loads((tmp_path / "ex.json").read_text())
    assert ex["examples"] == [] or ex["examples"][0]["title"] == "Food"  # shipped only if >= 6 of 8 hit
    assert food["grid"] == [f"{cond}:{s:g}" for cond, s in D.GRID]  # what reproduces a setting's batch

    # a partial run sweeps its themes and keeps the recorded evidence of the others
    assert D.main(["--preset", str(tiny_llama_preset), "--out", str(tmp_path / "ev"), "--examples",
                   str(tmp_path / "ex.json"), "--themes", "Music", "--max-new-tokens", "4"]) == 0
    both = json.loads((tmp_path / "ev" / "sweep.json").read_text())["themes"]
    assert [t["title"] for t in both] == ["Food", "Music"] and both[0] == food


def test_lens_candidates_returns_at_most_n_residual_features(tiny_bundle):
    got = D.lens_candidates(tiny_bundle, {"food", "cake"}, n=2)
    assert 1 <= len(got) <= 2 and all(f.split("/")[1] == "res" for f in got)


def test_seed_set_candidate_pairs_the_best_on_theme_features_by_distinct_index():
    words = set(D.THEMES["Food"]["words"].split())
    runs = lambda *hits: {f"baseline:{i}": {"hits": h} for i, h in enumerate(hits)}  # noqa: E731
    rec = {"words": sorted(words), "candidates": {
        "9/res/77": {"label": "cake, bread", "runs": {"baseline:3": {"hits": 0}, "cumulative:2": {"hits": 7}}},
        "26/res/1013": {"label": "tomato, sauce", "runs": runs(5, 2)},
        "27/res/1013": {"label": "sauces, pancakes", "runs": runs(4)},  # same index: the same feature carried on
        "7/res/514": {"label": "sauce, ketchup", "runs": runs(4, 1)},
        "19/res/9": {"label": "addr, LOG", "runs": runs(6)},  # not about food
        "11/res/415": {"label": "food, eating", "runs": runs(0)},  # never hit
    }}
    assert D.seed_set_candidate(rec) == "26/res/1013, 7/res/514"
    del rec["candidates"]["7/res/514"]
    assert D.seed_set_candidate(rec) is None


def test_a_seed_set_ties_as_the_larger_push():
    """`ranked`'s tie-break (the weaker push) counts every seed of a seed set: two features at s = 5
    push 10, more than one at s = 7 (session 14: the first seed-set sweep picked the pair on that tie)."""
    words = ["wedding"]
    rec = {"words": words, "candidates": {
        "25/res/573": {"label": "wedding", "span": [0, 29], "runs": {"baseline:7": {"hits": 3, "recheck_hits": 3}}},
        "25/res/573, 7/res/893": {"label": "wedding + wedding", "span": [0, 29],
                                  "runs": {"baseline:5": {"hits": 3, "recheck_hits": 3}}}}}
    assert D.choose(rec)[:2] == ("25/res/573", "baseline:7")


def test_seed_set_plans_as_the_app_does_and_makes_a_valid_example(tiny_bundle, tmp_path):
    """A seed-set candidate's plan is what the app runs for the example written from it (the
    Playground's plan of its settings), and the example loads in the app (schema pattern,
    `load_demo_examples`) with each seed at its own layer and each graph's own span quoted."""
    import json
    import re

    from steering.ui import DemoExample, Playground, load_demo_examples

    a, b = "1/res/3", "2/res/5"
    pair = f"{a}, {b}"
    specs = D.plan_for(tiny_bundle, pair, "baseline:4", "activate")
    assert [str(x.feature) for x in specs] == [a, b] and all(x.strength == 4.0 for x in specs)
    graphs = D.graphs_for(tiny_bundle, pair)
    rec = {"title": "Food", "task": "activate", "theme": "food", "words": ["food"], "prompt": "I think",
           "baseline_hits": 0, "chosen": {"feature": pair, "setting": "baseline:4", "hits": 6},
           "controls": {"prompted": {"hits": 8}, "random": {"hits": 0}}, "shipped": True,
           "candidates": {pair: {"span": D.span_of(graphs), "label": "food + cake",
                                 "runs": {"baseline:4": {"hits": 6}}}}}
    ex = D.example_json(rec, pair, "baseline:4", graphs, 8, tiny_bundle.preset.name)
    assert ex["layer"] is None and ex["condition"] == "seed-only" and ex["feature"] == pair
    assert "the two features together (strength 4 each)" in ex["explanation"]
    assert "Their flow graphs follow them across " + D.span_text(graphs) in ex["explanation"]
    schema = json.loads(open("assets/demo_examples.schema.json").read())
    pattern = schema["properties"]["examples"]["items"]["properties"]["feature"]["pattern"]
    assert re.match(pattern, pair) and not re.match(pattern, pair.replace(", ", ","))
    # what the app runs for the example written from the sweep's record is what the sweep measured
    app = Playground.create(tiny_bundle).plan(DemoExample(**ex).settings())
    assert [(x.feature, x.strength, x.mode) for x in app] == [(x.feature, x.strength, x.mode) for x in specs]
    (tmp_path / "ex.json").write_text(json.dumps({"examples": [ex]}))
    assert [e.feature for e in load_demo_examples(tiny_bundle, tmp_path / "ex.json")] == [pair]
