"""``python -m steering.experiments {groups,deactivation,steering}`` in smoke mode on the tiny random
preset: files written, shares sum to 1, every method and condition present, a rerun recomputes
nothing (unit files untouched), changed settings recompute only their units, bad options fail
with one clear line before any model is loaded."""

import json

import pytest

from steering.experiments import common
from steering.experiments.__main__ import main
from steering.groups import GROUPS, SINGLE_GROUPS
from steering.experiments.groups import PAPER_DOMAINS as DOMAINS  # the default domains of `groups`

THEMES = ["--theme", "1/res/5=weddings and marriage", "--theme", "2/res/7=religion",
          "--removal-theme", "1/res/9=physics", "--t-res", "0"]


def run(capsys, *argv) -> dict:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def unit_state(folder) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def test_groups_smoke_then_resume(tiny_llama_preset, out, capsys):
    argv = ["groups", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--out", str(out)]
    head = run(capsys, *argv)
    folder = out / "groups"
    s = json.loads((folder / "summary.json").read_text())
    assert s["command"] == "python -m steering.experiments " + " ".join(argv)
    assert set(s["n_texts"]) == set(DOMAINS) and all(n >= 1 for n in s["n_texts"].values())
    assert s["settings"]["texts_per_domain"] == 2 and s["settings"]["tokens_per_text"] == 2
    assert sorted(s["shares"], key=int) == ["0", "1", "2"]
    for shares in s["shares"].values():
        assert set(shares) == set(GROUPS)
        assert sum(shares.values()) == pytest.approx(1.0)
    assert s["shares"]["0"]["RES"] == 0.0  # layer 0 has no R_{-1}
    assert s["n_cases"] == sum(sum(c.values()) for c in s["counts"].values()) > 0
    assert set(s["mann_whitney"]["contains_vs_not"]) == {"s(R): groups with RES vs without",
                                                         "s(M): groups with MLP vs without",
                                                         "s(A): groups with ATT vs without"}
    for r in s["mann_whitney"]["pairwise"].values():
        assert 0 <= r["p"] <= 1 and 0 <= r["auc"] <= 1
    assert {"shares.html", "scores.html"} <= {p.name for p in folder.iterdir()}
    assert head["units"]["computed"] == len(DOMAINS)
    before = unit_state(folder / "units")
    assert len(before) == len(DOMAINS)
    again = run(capsys, *argv)
    assert again["units"]["computed"] == 0 and again["units"]["reused"] == len(DOMAINS)
    assert unit_state(folder / "units") == before
    assert json.loads((folder / "summary.json").read_text())["shares"] == s["shares"]


def test_deactivation_smoke_methods_groups_and_r(tiny_llama_preset, out, capsys):
    argv = ["deactivation", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--out", str(out)]
    head = run(capsys, *argv)
    folder = out / "deactivation"
    s = json.loads((folder / "summary.json").read_text())
    methods = ["top1_cosine", "top5_cosine", "random_top5", "permutation", "top1_pearson", "exhaustive"]
    assert list(s["table1"]) == methods
    for m in methods:
        t = s["table1"][m]
        assert t["n_cases"] > 0 and 0 <= t["n_with_predecessor"] <= t["n_cases"]
        if t["n_with_predecessor"]:
            assert 0 <= t["success_rate"] <= 1
    # top-1 cosine always finds an active predecessor (targets are never "From nowhere")
    assert s["table1"]["top1_cosine"]["n_with_predecessor"] == s["table1"]["top1_cosine"]["n_cases"]
    assert set(s["by_group"]) <= set(SINGLE_GROUPS) and s["by_group"]
    assert set(s["vs_r"]) == {"0", "-1"} and s["settings"]["layers"] == [1, 2]
    assert {"table1.html", "vs_r.html"} <= {p.name for p in folder.iterdir()}
    assert head["units"]["computed"] == 2
    before = unit_state(folder / "units")
    assert run(capsys, *argv)["units"] == {**head["units"], "computed": 0, "reused": 2}
    assert unit_state(folder / "units") == before


def test_steering_smoke_resume_and_partial_recompute(tiny_llama_preset, out, capsys, monkeypatch):
    argv = ["steering", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--out", str(out), *THEMES]
    run(capsys, *argv)
    folder = out / "steering"
    s = json.loads((folder / "summary.json").read_text())
    assert s["judge"]["name"].startswith(("offline", "openai"))
    act, rem = s["activate"], s["remove"]
    assert [t["feature"] for t in act["themes"].values()] == ["1/res/5", "2/res/7"]
    assert {p["condition"] for p in act["points"]} == {"baseline", "single", "constant", "exp", "linear", "random"}
    assert {p["condition"] for p in rem["points"]} == {"baseline", "single", "cumulative", "random"}
    assert {p["strength"] for p in rem["points"]} == {0.0, -4.0}
    for p in act["points"] + rem["points"]:
        assert 0 <= p["metric"] <= 1 and 0 <= p["coherence"] <= 1
    for theme in act["best"].values():
        assert {"baseline", "single", "constant", "exp", "linear", "random", "unsteered", "prompted"} == set(theme)
    units = sorted((folder / "units").glob("*.json"))
    # 2 themes x (unsteered + prompted + (5 conditions + random control) x 1 s)
    # + removal (unsteered + prompted + (3 conditions + random control) x 2 r)
    assert len(units) == 2 * 8 + 10
    s = json.loads((folder / "summary.json").read_text())
    assert set(s["activate"]["prompted"]) == set(s["activate"]["unsteered"])  # one prompting control per theme
    rnd = json.loads((folder / "units" / "activate__anger-and-frustration__random__s=4.json").read_text())
    assert rnd["settings"]["control_of"] == "exp" and len(rnd["result"]["rows"]) == 2
    assert any(p["condition"] == "random" for p in s["activate"]["points"])
    unit = json.loads((folder / "units" / "activate__anger-and-frustration__single__s=4.json").read_text())
    assert unit["command"].startswith("python -m steering.experiments steering")
    assert unit["settings"]["layers"] == [0, 1]  # span 0..2 at stride 6, plus the seed layer
    assert len(unit["result"]["rows"]) == 2  # 2 layers x 1 sample
    assert all(isinstance(r["text"], str) for r in unit["result"]["rows"])
    figs = {"activate_vs_layer.html", "activate_vs_strength.html", "activate_best.html", "activate_pareto.html",
            "remove_vs_layer.html", "remove_vs_strength.html", "remove_best.html", "remove_pareto.html"}
    assert figs <= {p.name for p in folder.iterdir()}

    before = unit_state(folder / "units")
    import steering.experiments.steering_curves as sc

    def no_generation(*a, **k):
        raise AssertionError("a cached unit was recomputed")

    monkeypatch.setattr(sc, "generate_variants", no_generation)
    assert run(capsys, *argv)["units"]["computed"] == 0
    assert unit_state(folder / "units") == before
    monkeypatch.undo()
    # a new strength computes only its own units ((5 conditions + random) x 2 themes); the old ones are reused
    more = run(capsys, *argv, "--strengths", "4,8",
               "--tasks", "activate")
    assert more["units"]["computed"] == 12 and more["units"]["reused"] == 16


@pytest.mark.parametrize("argv, message", [
    (["groups", "--texts", "0"], "--texts must be a positive integer"),
    (["groups", "--domains", "poetry"], "unknown domains"),
    (["deactivation", "--methods", "top1_cosine,magic"], "unknown --methods"),
    (["deactivation", "--r-sweep=-1,x"], "--r-sweep must be comma-separated numbers"),
    (["deactivation", "--r", "-100"], "out of range"),
    (["steering", "--theme", "8/res/697"], "must be FEATURE=THEME"),
    (["steering", "--strengths", "1e9"], "out of range"),
    (["steering", "--tasks", "dance"], "unknown --tasks"),
    (["steering", "--preset", "no-such-preset"], "unknown preset"),
])
def test_bad_options_fail_clearly(argv, message, capsys):
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_steering_without_catalog_or_themes_says_what_to_pass(tiny_llama_preset, tmp_path, capsys):
    assert main(["steering", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--out", str(tmp_path)]) == 2
    assert "pass --theme FEATURE=THEME" in capsys.readouterr().err


def test_units_recompute_on_changed_settings_and_corrupt_files(tmp_path):
    units = common.Units(tmp_path, "cmd")
    calls = []
    assert units.get("a", {"x": (1, 2)}, lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert units.get("a", {"x": [1, 2]}, lambda: calls.append(1) or {"v": 2}) == {"v": 1}  # tuples == lists
    assert units.get("a", {"x": [1, 3]}, lambda: calls.append(1) or {"v": 3}) == {"v": 3}
    units.path("a").write_text("{broken")
    assert units.get("a", {"x": [1, 3]}, lambda: calls.append(1) or {"v": 4}) == {"v": 4}
    assert len(calls) == 3 and units.reused == ["a"]


def test_passages_cover_the_document():
    doc = " ".join(f"word{i}" for i in range(500))
    parts = common.passages(doc, 200)
    assert all(len(p) <= 200 for p in parts) and " ".join(parts).split() == doc.split()


def test_groups_on_ray_workers_equal_the_serial_run_and_resume(tiny_llama_preset, tmp_path, capsys):
    """Issue 21: the same units fanned out to 2 local Ray workers give the serial run's results,
    unit for unit; a rerun reads them all back; a run killed midway resumes (one unit removed is
    the only one recomputed)."""
    base = ["groups", "--preset", str(tiny_llama_preset), "--smoke", "--quiet"]
    run(capsys, *base, "--out", str(tmp_path / "serial"))
    fanned = run(capsys, *base, "--out", str(tmp_path / "ray"), "--workers", "2")
    assert fanned["units"]["computed"] == len(DOMAINS)

    def results(root):
        return {p.name: json.loads(p.read_text())["result"] for p in sorted((root / "groups" / "units").glob("*.json"))}

    assert results(tmp_path / "ray") == results(tmp_path / "serial")
    s_ray = json.loads((tmp_path / "ray" / "groups" / "summary.json").read_text())
    s_serial = json.loads((tmp_path / "serial" / "groups" / "summary.json").read_text())
    assert s_ray["shares"] == s_serial["shares"] and s_ray["scores"] == s_serial["scores"]
    victim = sorted((tmp_path / "ray" / "groups" / "units").glob("*.json"))[0]
    victim.unlink()
    again = run(capsys, *base, "--out", str(tmp_path / "ray"), "--workers", "2")
    assert again["units"]["computed"] == 1 and again["units"]["reused"] == len(DOMAINS) - 1
    assert results(tmp_path / "ray") == results(tmp_path / "serial")


def test_negative_workers_are_refused(tiny_llama_preset, tmp_path, capsys):
    argv = ["groups", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--out", str(tmp_path),
            "--workers", "-1"]
    assert main(argv) == 2 and "--workers" in capsys.readouterr().err


def _close(a, b, rel: float = 1e-5) -> bool:
    """Nested dicts/lists equal, floats up to ``rel`` relative or 1e-6 absolute difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=rel, abs=1e-6)
    return a == b


def test_deactivation_on_ray_workers_equals_the_serial_run(tiny_llama_preset, tmp_path, capsys):
    """Issue 21: Table 1 units (one per r) fanned out to 2 Ray workers, each fitting its own
    top1_pearson tables, give the serial run's results unit for unit."""
    base = ["deactivation", "--preset", str(tiny_llama_preset), "--smoke", "--quiet"]
    run(capsys, *base, "--out", str(tmp_path / "serial"))
    fanned = run(capsys, *base, "--out", str(tmp_path / "ray"), "--workers", "2")
    assert fanned["units"]["computed"] == 2

    def results(root):
        return {p.name: json.loads(p.read_text())["result"]
                for p in sorted((root / "deactivation" / "units").glob("*.json"))}

    serial = results(tmp_path / "serial")
    # counts equal exactly; activation changes up to float32 reduction order (a Ray worker runs
    # torch with its own thread count, which reorders sums: differences of ~1e-7 were seen)
    assert _close(results(tmp_path / "ray"), serial) and len(serial) == 2
    assert all(u["summary"]["top1_pearson"]["n_cases"] > 0 for u in serial.values())


def test_steering_on_ray_workers_equals_the_serial_run(tiny_llama_preset, tmp_path, capsys):
    """Issue 21: steering-curve units (generation, controls, offline judge) fanned out to 2 Ray
    workers, each building its own flow graphs and judge, give the serial run's texts and scores."""
    base = ["steering", "--preset", str(tiny_llama_preset), "--smoke", "--quiet", "--judge", "offline", *THEMES]
    serial = run(capsys, *base, "--out", str(tmp_path / "serial"))
    fanned = run(capsys, *base, "--out", str(tmp_path / "ray"), "--workers", "2")
    assert fanned["units"]["computed"] == serial["units"]["computed"] > 4

    def results(root):
        return {p.name: json.loads(p.read_text())["result"]
                for p in sorted((root / "steering" / "units").glob("*.json"))}

    assert results(tmp_path / "ray") == results(tmp_path / "serial")


def test_sae_fingerprint_sees_any_latent(tiny_bundle):
    """The experiments' unit caches are keyed by `sae_fingerprint`: changing the last decoder row
    of one SAE (as reviving a dead latent does) changes it; restoring the row restores it."""
    import torch

    from steering.experiments.common import sae_fingerprint

    key = sorted(tiny_bundle.saes)[-1]
    sae = tiny_bundle.sae(*key)
    before = sae_fingerprint(tiny_bundle)
    row = sae.W_dec[-1].detach().clone()
    try:
        with torch.no_grad():
            sae.W_dec[-1] = torch.roll(row, 1)
        assert sae_fingerprint(tiny_bundle) != before
    finally:
        with torch.no_grad():
            sae.W_dec[-1] = row
    assert sae_fingerprint(tiny_bundle) == before
