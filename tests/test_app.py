"""The app on a tiny preset: its API driven through gradio_client against a live `python app.py`
on 127.0.0.1 (results checked against the CLI and the library), and its handlers in process."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING
from pathlib import Path

import pytest

from apprun import ROOT, TINY_FEATURE

STEER_DEFAULTS = dict(feature=TINY_FEATURE, t_res=0.5, t_module=0.15, task="activate", condition="cumulative", layer=-1,
                      strength=4.0, schedule="exp", alpha=-0.25, s_end=1.0, r=0, exclude=[], include=[], seed=5, samples=1,
                      max_new_tokens=8, prompt="I think", chat=False, theme="wedding", compare=False, api_key="",
                      controls=[], scope="all")


def steer_args(**changes) -> list:
    return list({**STEER_DEFAULTS, **changes}.values())


@pytest.fixture(scope="module")
def client(live_app):
    from gradio_client import Client

    return Client(live_app["url"], verbose=False)


def cli(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "steering", *args, "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_every_event_is_a_named_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/search", "/features_for_text", "/card", "/flow", "/schedule", "/steer", "/demo"} <= names


def test_search_matches_the_cli(client, live_app):
    plain = client.predict(live_app["word"], api_name="/search")  # lay labels by default
    rows = client.predict(live_app["word"], True, api_name="/search")  # the researcher view: raw labels
    plain, rows = (x["data"] if isinstance(x, dict) else x for x in (plain, rows))
    expected = cli("catalog", "search", live_app["word"], "--preset", live_app["preset"])["hits"]
    assert rows and [r[0] for r in rows] == [h["feature"] for h in expected] == [r[0] for r in plain]
    assert [r[1] for r in rows] == [h["label"] for h in expected]
    assert [r[1] for r in plain] == [live_app["catalog"].plain_label(r[0]) for r in plain]


def test_flow_matches_the_cli(client, live_app):
    out = client.predict(TINY_FEATURE, 0.5, 0.15, "", api_name="/flow")
    graph = out[2]
    assert graph == cli("flow", TINY_FEATURE, "--preset", live_app["preset"])
    rows = out[1]["data"] if isinstance(out[1], dict) else out[1]
    assert sorted(r[0] for r in rows) == sorted(n["id"] for n in graph["nodes"])


def test_flow_live_activations_match_the_library(client, live_app):
    from steering.flow import build_flow_graph
    from steering.groups import live_activations

    out = client.predict(TINY_FEATURE, 0.5, 0.15, "the bride and the groom", api_name="/flow")
    live = out[3]
    assert live["visible"] is True
    heat = json.loads(live["value"]["plot"])["data"][0]
    expected = live_activations(live_app["bundle"], build_flow_graph(live_app["bundle"], TINY_FEATURE),
                                "the bride and the groom")
    assert heat["y"] == list(expected["acts"])[:30]
    assert heat["z"] == [expected["acts"][k] for k in heat["y"]]


def test_steer_matches_the_cli_and_records_the_run(client, live_app):
    _, _, _, _, path, record, _ = client.predict(*steer_args(), api_name="/steer")
    command = shlex.split(record["reproduce"])  # the record says how to regenerate it with the CLI
    assert command[:4] == ["python", "-m", "steering", "steer"] and "#" not in record["reproduce"]
    expected = cli(*command[3:])
    texts = {g["variant"]: g["text"] for g in record["generations"]}
    assert texts == {"unsteered": expected["unsteered"], "steered": expected["steered"]}
    assert texts["unsteered"] != texts["steered"]  # strength 4 on the whole flow changes a random model's text
    assert record["schedules"]["steered"] == expected["schedule"]
    assert record["seeds"] == [5] and record["feature"] == TINY_FEATURE and record["preset"] == "tiny-app"
    assert record["model_hash"].startswith("safetensors-sha256:")
    assert set(record["sae_hashes"]) == {r["feature"].rsplit("/", 1)[0] for r in expected["schedule"]}
    assert all(s["offline"] and s["available"] for s in record["scores"])  # labelled offline fallback judge
    assert json.loads(Path(path).read_text()) == record


def test_steer_takes_keyword_arguments(client):
    """The README's keyword form: arguments by name, the others from the form's defaults, give the
    same run as all of them by position."""
    by_name = client.predict(feature=TINY_FEATURE, strength=4.0, alpha=-0.25, seed=5, samples=1, max_new_tokens=8,
                             theme="wedding", controls=[], api_name="/steer")[5]
    by_position = client.predict(*steer_args(), api_name="/steer")[5]
    assert [g["text"] for g in by_name["generations"]] == [g["text"] for g in by_position["generations"]]
    assert by_name["settings"] == by_position["settings"]


def test_third_column_compares_single_and_cumulative(client):
    base, steered, other, _, _, record, _ = client.predict(*steer_args(compare=True), api_name="/steer")
    assert {g["variant"] for g in record["generations"]} == {"unsteered", "steered", "single"}
    assert other["visible"] is True  # the third column is an update: shown with its text
    assert "single layer" in other["value"] and "Steered" in steered and "Unsteered" in base


@pytest.mark.parametrize("changes, msg", [
    (dict(strength=1e6), r"Strength s .* = 1000000 is out of range; allowed: -200..200"),
    (dict(max_new_tokens=10_000), r"Max new tokens = 10000 is out of range; allowed: 1..\d+"),
    (dict(samples=99), r"Samples = 99 is out of range; allowed: 1..\d+"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="x" * 5000), "prompt is too long"),
    (dict(condition="everything"), "Condition"),
    (dict(feature="9/res/3"), "valid layers: 0..2"),
    (dict(feature="1/res/99999"), "valid indices for 1/res"),
    (dict(feature="<b>1/res/3"), "malformed feature id"),
    (dict(feature="1/neuron/3"), "unknown site 'neuron'"),
    (dict(max_new_tokens=-5), r"Max new tokens = -5 is out of range; allowed: 1..\d+"),
    (dict(samples=0), r"Samples = 0 is out of range"),
    (dict(max_new_tokens=10**9), r"Max new tokens = 1000000000 is out of range"),  # not 1e+09
    (dict(seed=2**70), r"Seed = ~10\^21 is out of range; allowed: 0..2147483647"),
    (dict(seed=-10**400), r"Seed = -~10\^400 is out of range"),  # longer than any float
    (dict(prompt="\x00\x07\u200b"), "prompt is empty"),
    (dict(schedule="zigzag"), "zigzag"),
    (dict(task="explode"), "explode"),
])
def test_bad_steer_input_is_a_short_error_and_the_server_keeps_serving(client, live_app, changes, msg):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=msg) as e:
        client.predict(*steer_args(**changes), api_name="/steer")
    assert "Traceback" not in str(e.value) and "<b>" not in str(e.value)
    assert live_app["server"].proc.poll() is None
    assert client.predict("1/res/3", api_name="/card")[0].startswith("### Feature")


@pytest.mark.parametrize("field, value, msg", [
    ("strength", "NaN", r"Strength s .* = nan is out of range; allowed: -200..200"),
    ("alpha", "Infinity", r"Decay alpha .* = inf is out of range; allowed: -5..5"),
    ("max_new_tokens", "1e308", r"Max new tokens = 1e\+308 is out of range"),
])
def test_non_finite_numbers_over_raw_http_are_refused(live_app, field, value, msg):
    """gradio_client cannot send NaN/inf (JSON has none), but a stranger with curl can: the REST API
    must refuse them by name, and the server keeps serving."""
    import re

    import httpx

    args = dict(STEER_DEFAULTS)
    args[field] = "__X__"
    body = json.dumps({"data": list(args.values())}).replace('"__X__"', value)
    base = live_app["url"].rstrip("/")
    r = httpx.post(f"{base}/gradio_api/call/steer", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text
    events = httpx.get(f"{base}/gradio_api/call/steer/{r.json()['event_id']}", timeout=120).text
    assert "event: error" in events and re.search(msg, events), events[:500]
    assert "Traceback" not in events
    assert live_app["server"].proc.poll() is None


def test_api_key_is_never_echoed_or_logged(client, live_app):
    key = "sk-test-DoNotLeak-0123456789abcdef"
    base, steered, _, _, path, record, _ = client.predict(*steer_args(api_key=key), api_name="/steer")
    scores = [s for g, s in zip(record["generations"], record["scores"]) if g["text"].strip()]
    assert scores and all(not s["available"] and "unavailable" in s["error"] for s in scores), scores
    assert {g["variant"] for g in record["generations"]} == {"unsteered", "steered"}  # texts shown anyway
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:  # an error in the same request does not carry the key either
        client.predict(*steer_args(api_key=key, strength=1e6), api_name="/steer")
    other = client.predict(*steer_args(seed=99), api_name="/steer")  # the next request (another user) has no key
    assert other[5]["judge"].startswith("offline")  # the server's own judge, not the key of the request before
    for blob in (base, steered, json.dumps(record), Path(path).read_text(), str(e.value), json.dumps(other),
                 live_app["server"].log()):
        assert key not in blob and "DoNotLeak" not in blob


def test_odd_unicode_prompts_generate(client):
    """Control characters are dropped, other scripts and emoji pass through to the model."""
    record = client.predict(*steer_args(prompt="I think \x01🙂 مرحبا\u202e\tnaïve ", max_new_tokens=4),
                            api_name="/steer")[5]
    assert {g["variant"] for g in record["generations"]} == {"unsteered", "steered"}
    assert "\x01" not in record["prompt"] and "🙂" in record["prompt"]


def test_concurrent_sessions_get_their_own_results(live_app):
    """Eight sessions steering different features with different seeds at once get exactly what they
    get one at a time; afterwards the server's model carries no steering hook."""
    from gradio_client import Client

    features = ["1/res/3", "0/res/5", "2/res/7", "1/mlp/2", "2/res/1", "1/res/9", "0/res/2", "2/res/4"]

    def run(i: int) -> list[str]:
        c = Client(live_app["url"], verbose=False)
        record = c.predict(*steer_args(feature=features[i], seed=11 + i, max_new_tokens=6, condition="baseline"),
                           api_name="/steer")[5]
        return [g["text"] for g in record["generations"]]

    alone = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(run, range(8)))
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1  # the sessions really differ
    health = Client(live_app["url"], verbose=False).predict(api_name="/health")
    assert health["hooks"] == 0 and health["rss_mb"] > 0


# ---- in process: handlers called directly, no server ---------------------------------------------

@pytest.fixture(scope="module")
def built_app(live_app):
    import app
    from steering.ui import Playground

    with pytest.MonkeyPatch.context() as mp:  # the tiny demo example, as the live app has it
        mp.setenv("FFP_DEMO_FILE", live_app["demo_file"])
        return app.build_app(Playground.create(live_app["bundle"]))


@pytest.fixture(scope="module")
def app_fns(built_app, live_app):
    return {f.api_name: f.fn for f in built_app.fns.values() if f.api_name}, live_app["bundle"]


def test_handlers_leave_no_hooks_even_on_errors(app_fns):
    import gradio as gr

    from steering.sites import count_hooks

    fns, bundle = app_fns
    before = count_hooks(bundle.model)
    out = last(fns["steer"](*steer_args(max_new_tokens=4)))
    assert "Steered" in out[1]
    loose = last(fns["steer"](*steer_args(max_new_tokens=4, layer=None, exclude="", include="")))  # API spellings
    assert loose[5]["schedules"] == out[5]["schedules"]
    with pytest.raises(gr.Error, match="theme is too long"):
        last(fns["steer"](*steer_args(theme="t" * 400)))
    with pytest.raises(gr.Error, match="cannot include"):
        last(fns["steer"](*steer_args(include=["0/res/0"])))
    assert count_hooks(bundle.model) == before == 0


def last(out):
    """The final output of a handler (the steer handler streams: it is a generator)."""
    import inspect

    return list(out)[-1] if inspect.isgenerator(out) else out


def test_steer_streams_the_texts_while_they_are_written(app_fns, monkeypatch):
    """Issue 17: the columns fill token by token; the last update is the finished run."""
    import time

    from steering import generate as G

    put = G.RowStreamer.put
    monkeypatch.setattr(G.RowStreamer, "put", lambda self, v: (put(self, v), time.sleep(0.15)))
    fns, _ = app_fns
    updates = list(fns["steer"](*steer_args(max_new_tokens=8, controls=["random"])))
    partial, final = updates[:-1], updates[-1]
    # writing while tokens arrive; once every row has ended, "written; scores follow" until the judge is done
    assert len(partial) >= 2 and "writing…" in partial[0][1]
    assert all("writing…" in u[1] or "written; scores follow…" in u[1] for u in partial)
    assert "writing" not in final[1] and "scores follow" not in final[1] and final[5]["generations"]
    grown = [len(u[1]) for u in partial]
    assert grown == sorted(grown) and grown[-1] > grown[0]  # the steered column grows as tokens arrive
    assert any(isinstance(u[6], dict) and "random directions" in str(u[6].get("value", "")) for u in partial)


def test_demo_evidence_panel_is_wired(built_app):
    """The Demo tab's evidence panel is built with the first example's record (the tiny examples
    file names no evidence, so it says so) and follows the example picker."""
    cfg = built_app.get_config_file()
    comp = {c["id"]: c for c in cfg["components"]}
    panel = next(c for c in cfg["components"] if c.get("props", {}).get("elem_id") == "demo-evidence")
    assert "No recorded fresh-seed samples" in panel["props"]["value"]
    pick = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == "demo-pick")
    assert any(panel["id"] in d["outputs"] and [pick, "change"] in [list(t) for t in d["targets"]]
               for d in cfg["dependencies"]), "the panel follows the picked example"
    assert comp[pick]["type"] == "radio"


def test_demo_streams_the_graph_first_then_the_texts(app_fns, monkeypatch):
    """Issue 17: a curated example shows its flow graph and prompt at once, then every column fills
    token by token (it had shown a progress bar for the whole generation); the last frame is the run."""
    import re
    import time

    from steering import generate as G

    put = G.RowStreamer.put
    monkeypatch.setattr(G.RowStreamer, "put", lambda self, v: (put(self, v), time.sleep(0.15)))
    fns, _ = app_fns
    frames = list(fns["demo"]("Tiny example"))
    first, partial, final = frames[0], frames[1:-1], frames[-1]
    assert first[0].data and first[1] == first[2] == "" and first[4].startswith("**Prompt**")
    # each column says what it is doing: writing while tokens arrive, scoring once all its rows ended
    status = [re.search(r"<small>(writing|written; scores follow|waiting for its turn)…</small>", f[2]).group(1)
              for f in partial]
    done = "written; scores follow"
    assert len(partial) >= 2 and status[0] == "writing" and set(status) <= {"writing", done}
    assert status == sorted(status, key=["writing", done].index)  # never back to writing
    grown = [len(f[2]) for f in partial]
    assert grown == sorted(grown) and grown[-1] > grown[0]
    assert any("Control: random directions" in f[5] for f in partial)  # the controls stream too
    if "Control: asking the model" in final[5]:  # its place is kept from the first frame (a second batch)
        assert "Control: asking the model" in partial[0][5]
    assert "writing" not in final[2] and "Steered" in final[2] and final[0] is first[0] and final[3] is not None


def test_schedule_preview_follows_the_schedule(app_fns):
    from steering.flow import build_flow_graph
    from steering.steer import plan, schedule_table

    fns, bundle = app_fns
    fig, rows = fns["schedule"](TINY_FEATURE, 0.5, 0.15, "activate", "cumulative", -1, 6.0, "exp", -0.5, 1.0, 0,
                                [], [])
    graph = build_flow_graph(bundle, TINY_FEATURE)
    assert rows == schedule_table(plan(graph, "cumulative", None, 6.0, "exp", -0.5), bundle)
    assert sum(len(t.x) for t in fig.data) == len(rows)


def test_one_message_per_error_and_no_stale_results(built_app):
    """Issue 17: a bad id in the flow box raises one toast (the plan preview runs only after the graph
    succeeded), and a failed run empties what the previous run left in its outputs."""
    deps = built_app.get_config_file()["dependencies"]
    by_name = {d["api_name"]: d for d in deps}
    flow, schedule = by_name["flow"], by_name["schedule"]
    assert schedule["trigger_after"] == flow["id"] and schedule["trigger_only_on_success"]
    clicks = [d for d in deps if any(t in [tuple(x) for x in flow["targets"]] for t in map(tuple, d["targets"]))]
    assert clicks == [flow]  # nothing else listens to the button itself
    for name in ("search", "features_for_text", "flow", "steer", "demo"):
        main = by_name[name]
        failed = [d for d in deps if d["trigger_after"] == main["id"] and d["trigger_only_on_failure"]]
        assert len(failed) == 1, name
        assert set(main["outputs"][:3]) <= set(failed[0]["outputs"]), name
        fn = built_app.fns[failed[0]["id"]].fn
        assert all(v is None for v in (fn() if len(failed[0]["outputs"]) > 1 else [fn()])), name


def test_prompt_shown_with_each_run_and_carried_settings_kept(built_app):
    """Issue 17: the prompt line above the columns fills when a run starts; the task's default prompt
    replaces the prompt only when a person changes the task, not when an example sets it."""
    deps = built_app.get_config_file()["dependencies"]
    fn = {d["id"]: getattr(built_app.fns[d["id"]].fn, "__name__", "") for d in deps}
    steer = next(d for d in deps if d["api_name"] == "steer")
    prompt = next(d for d in deps if fn[d["id"]] == "prompt_line")
    assert prompt["targets"] == steer["targets"]
    assert [t[1] for d in deps if fn[d["id"]] == "task_defaults" for t in d["targets"]] == ["input"]


def test_playground_steers_a_seed_set(app_fns):
    """Issue 18: ids separated by commas in the feature box: card, merged flow graph, plan and run."""
    fns, _ = app_fns
    seeds = f"{TINY_FEATURE}, 2/res/5"
    card, _ = fns["card"](seeds)
    assert "Seed set of 2 features" in card and f"### Feature `{TINY_FEATURE}`" in card
    fig, rows, graphs, *_ = fns["flow"](seeds, 0.5, 0.15, "")
    assert [g["seed"] for g in graphs] == [TINY_FEATURE, "2/res/5"] and "seed set" in fig.layout.title.text
    assert {r[0] for r in rows} == {n["id"] for g in graphs for n in g["nodes"]}
    out = last(fns["steer"](*steer_args(feature=seeds, max_new_tokens=4)))
    record = out[5]
    assert record["settings"]["features"] == [TINY_FEATURE, "2/res/5"]
    assert {r["feature"] for r in record["schedules"]["steered"]} >= {TINY_FEATURE, "2/res/5"}
    _, plan_rows = fns["schedule"](seeds, 0.5, 0.15, "activate", "cumulative", -1, 4.0, "exp", -0.25, 1.0, 0, [], [])
    assert plan_rows == record["schedules"]["steered"]


def test_finding_features_views(app_fns, live_app):
    """Issue 17: lay labels by default, raw ones in the researcher view; the probe hides sinks and
    form features unless asked; the tables relabel in place."""
    fns, _ = app_fns
    h = fns["search"].__self__
    cat = live_app["catalog"]
    plain = fns["search"](live_app["word"])
    raw = fns["search"](live_app["word"], True)
    assert [r[1] for r in raw] == [cat.label(r[0]) for r in raw]
    assert [r[1] for r in plain] == [cat.plain_label(r[0]) for r in plain] and all("→" not in r[1] for r in plain)
    assert [r[2] for r in plain] == sorted((r[2] for r in plain), reverse=True)
    assert h.relabel(plain, [], True) == (raw, [])
    lay_card, researcher_card = fns["card"](TINY_FEATURE)[0], fns["card"](TINY_FEATURE, True)[0]
    assert "logit lens" not in lay_card and "Promotes (logit lens)" in researcher_card
    assert f"**{cat.plain_label(TINY_FEATURE)}**" in lay_card and f"**{cat.label(TINY_FEATURE)}**" in researcher_card
    assert h.card_view(TINY_FEATURE, True) == researcher_card
    spans, rows = fns["features_for_text"]("the bride and the groom")
    spans_all, rows_all = fns["features_for_text"]("the bride and the groom", True)
    assert spans[0][1] is None and spans_all[0][1] is not None  # the sink, shown on request
    form = {f"{l}/{s}/{i}" for l, s in live_app["bundle"].saes for i, x in enumerate(cat.function_features(l, s)) if x}
    assert not {r[0] for r in rows} & form and not {t for _, t in spans if t} & form
    assert "".join(t for t, _ in spans) == "the bride and the groom"


def test_flow_graph_labels_follow_the_view(app_fns, live_app):
    """Walkthrough: the flow graph's hover showed raw labels ("art, arts, gebra · ctx: ... → ...") in
    the lay view. Now hover and node table use whole-word labels unless the researcher view is on,
    and toggling the view redraws the graph on screen with the other labels."""
    import re

    fns, _ = app_fns
    h, cat = fns["flow"].__self__, live_app["catalog"]

    def hovers(fig) -> dict:
        return {re.search(r"<b>(.+?)</b>", t).group(1): t for tr in fig.data if tr.mode == "markers+text"
                for t in tr.hovertext}

    fig, rows, graph, *_ = fns["flow"](TINY_FEATURE, 0.5, 0.15, "")
    lay = hovers(fig)
    assert any(cat.label(f) != cat.plain_label(f) for f in lay)  # else the check below proves nothing
    assert all(cat.plain_label(f) in t for f, t in lay.items())
    assert all(cat.label(f) not in t for f, t in lay.items() if cat.label(f) != cat.plain_label(f))
    assert {r[0]: r[-1] for r in rows} == {f: cat.plain_label(f) for f in lay}
    raw_fig, raw_rows, _ = h.flow_relabel(graph, "", True)
    assert all(cat.label(f) in t for f, t in hovers(raw_fig).items())
    assert {r[0]: r[-1] for r in raw_rows} == {f: cat.label(f) for f in lay}
    assert hovers(fns["flow"](TINY_FEATURE, 0.5, 0.15, "", True)[0]) == hovers(raw_fig)
    demo_fig = last(fns["demo"]("Tiny example"))[0]
    assert all(cat.plain_label(f) in t for f, t in hovers(demo_fig).items())


def test_open_in_playground_carries_every_setting_and_says_so(app_fns, live_app):
    fns, _ = app_fns
    h = fns["steer"].__self__
    out = h.open_in_playground("Tiny example")
    assert out[1] == TINY_FEATURE and out[-1].startswith("**Settings carried from the demo example “Tiny example”**")
    assert "1 samples from seed 0" in out[-1] and "8 new tokens" in out[-1]


# ---- curated demo examples ------------------------------------------------------------------------

def test_demo_example_schema_matches_the_loader():
    from steering.ui import DEMO_FILE, DemoExample, load_demo_examples

    schema = json.loads((ROOT / "assets" / "demo_examples.schema.json").read_text())
    item = schema["properties"]["examples"]["items"]
    assert set(item["properties"]) == set(DemoExample.__dataclass_fields__)
    assert set(item["required"]) == {f for f, v in DemoExample.__dataclass_fields__.items() if v.default is MISSING}
    for ex in load_demo_examples(None, DEMO_FILE):  # the shipped file, when the lead has filled it
        assert ex.title and ex.theme


@pytest.mark.parametrize("row, msg", [
    ({"title": "a", "feature": "1/res/3", "theme": "x", "colour": "red"}, "unknown keys"),
    ({"title": "a", "feature": "1/xyz/3", "theme": "x"}, "unknown site"),
    ({"title": "a", "feature": "1/res/3", "theme": "x", "strength": float("inf")}, "strength must be finite"),
    ({"title": "a", "feature": "1/res/3", "theme": "x", "condition": "all"}, "unknown condition"),
])
def test_bad_demo_examples_fail_loudly(tmp_path, row, msg):
    from steering.ui import load_demo_examples

    path = tmp_path / "demo.json"
    path.write_text(json.dumps({"examples": [row]}))
    with pytest.raises(ValueError, match=msg):
        load_demo_examples(None, path)


def test_steer_controls_columns_and_record(client):
    """Both controls run beside the steered text, are scored, and land in the run record."""
    out = client.predict(*steer_args(controls=["prompt", "random"], samples=2), api_name="/steer")
    record, ctrl = out[5], out[6]
    ctrl = ctrl["value"] if isinstance(ctrl, dict) else ctrl  # a gr.update (value + visible)
    assert "Control: asking the model" in ctrl and "Control: random directions" in ctrl
    variants = {g["variant"] for g in record["generations"]}
    assert {"unsteered", "steered", "prompted", "random"} <= variants
    assert len(record["scores"]) == len(record["generations"])
    assert record["settings"]["controls"] == ["prompt", "random"]


def test_concurrent_clients_are_batched_and_get_what_they_get_alone(live_app):
    """Issue 21: 4 gradio clients steering at once (same prompt and settings, different features,
    strengths and seeds) are merged into one batch by the app, and each gets the texts it gets
    alone."""
    from gradio_client import Client

    asks = [steer_args(seed=s, strength=st, controls=["random"]) for s, st in ((1, 4.0), (2, -3.0), (3, 6.0), (4, 1.0))]
    log_before = live_app["server"].log_path.read_text().count("batched ")

    def ask(args):
        return Client(live_app["url"], verbose=False).predict(*args, api_name="/steer")[5]

    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(ask, asks))
    alone = [ask(a) for a in asks]
    for t, a in zip(together, alone):
        assert [(g["variant"], g["seed"], g["text"]) for g in t["generations"]] == \
            [(g["variant"], g["seed"], g["text"]) for g in a["generations"]]
    assert live_app["server"].log_path.read_text().count("batched ") > log_before  # some requests were merged


def test_judge_theme_from_search_words_is_kept_when_the_label_names_none(live_app, monkeypatch):
    """A picked search result carries the search words into the judge theme; the card replaces them
    with the feature's own words when its label names any; when it names none, a theme that an
    earlier card set is cleared, and one a person, a search or an example put there is kept."""
    from types import SimpleNamespace

    from app_handlers import Handlers, pick_hit
    from steering.ui import Playground

    assert pick_hit(" wedding ", SimpleNamespace(row_value=["1/res/3", "x", 1.0, ""])) == ("1/res/3", "wedding")
    h = Handlers(Playground.create(live_app["bundle"]))
    real = h.pg.card_markdown
    md, own = real("1/res/3")
    kept = lambda x: isinstance(x, dict) and "value" not in x  # noqa: E731  (gr.update() with no value)
    if own:  # the card names a theme: it wins and becomes the automatic one
        assert h.card_quiet("1/res/3", False, "wedding", "") == (md, own, own)
    monkeypatch.setattr(h.pg, "card_markdown", lambda f, r=False: (real(f, r)[0], ""))  # a label naming no theme
    out = h.card_quiet("1/res/3", False, "religious, spiritual", "religious, spiritual")
    assert out[1:] == ("", "")  # the previous card's theme is not carried to this feature
    out = h.card_quiet("1/res/3", False, "wedding", "religious, spiritual")
    assert kept(out[1]) and out[2] == "religious, spiritual"  # the search words (or a person's) stay
    hint, keep, auto = h.card_quiet("1/res/", False, "wedding", "")
    assert hint.startswith("_") and kept(keep) and kept(auto)


def test_a_picked_feature_starts_at_its_own_layer():
    """Walkthrough (session 15): Demo "Music" -> Open in the Playground -> pick a search result: the
    carried layer 27 lay outside the new feature's span, so the preview, the graph and Steer were
    all refused. A pick sets the layer back to the seed's layer and the carried note says so."""
    from app_handlers import layer_after_pick

    layer, note = layer_after_pick("4/res/507", 27, "Settings carried from the demo example \"Music\"")
    assert layer == -1 and "4/res/507" in note and note.startswith("Settings carried") and "still apply" in note
    layer, note = layer_after_pick("4/res/507", 12, "")  # a layer set by hand: reset, no note to amend
    assert layer == -1 and isinstance(note, dict) and "value" not in note
    assert all(isinstance(x, dict) and "value" not in x for x in layer_after_pick("4/res/507", -1, "carried"))


def test_demo_headline_and_columns_use_one_scale_and_say_what_was_asked(app_fns, live_app):
    """The demo's headline gives theme and readability on /5 with the median perplexity of both
    columns (the offline coherence alone is 5/5 for most fluent-looking text); column means use
    the same /5 scale; the asking control shows the request it made."""
    import re

    fns, _ = app_fns
    _, _, steered, _, gain, ctrl = last(fns["demo"]("Tiny example"))
    assert re.search(r"\*\*Theme score\*\* \([^)]+\): \d\.\d/5 without steering -> \*\*\d\.\d/5\*\* with it", gain)
    assert re.search(r"\*\*Readability\*\* \(the paper's coherence\): \d\.\d/5 -> \d\.\d/5 \(median perplexity under "
                     r"the unsteered model "
                     r"\d+ -> \d+\)", gain)
    assert re.search(r"mean theme \*\*\d\.\d/5\*\* · readability \*\*\d\.\d/5\*\* · metric \*\*[01]\.\d\d\*\*", steered)
    assert f"prompt: «Talk about {live_app['word']}.», then «" in ctrl


def test_demo_headline_counts_by_the_sweeps_rule():
    """For a swept theme the Demo headline adds the sweep's own rule per column (a theme word in a
    readable text; removal: none), counted on the run's texts; nothing for other titles."""
    from types import SimpleNamespace as G

    from app_handlers import Handlers

    gens = [G(variant="unsteered", seed=0, text="I think it rained.", metrics={"perplexity": 20.0, "distinct_2": 1.0}),
            G(variant="steered", seed=0, text="I think the football team won.",
              metrics={"perplexity": 30.0, "distinct_2": 1.0}),
            G(variant="steered", seed=1, text="I think the goal was great.", metrics={"perplexity": 300.0,
                                                                                     "distinct_2": 1.0})]
    note = Handlers._rule_note({"generations": gens}, "Sport")
    assert "unsteered 0 of 1, steered 1 of 2." in note and "perplexity <= 100" in note  # the second: unreadable
    removal = Handlers._rule_note({"generations": [G(variant="steered", seed=0, text="I think about ethics.",
                                                     metrics={"perplexity": 20.0, "distinct_2": 1.0})]},
                                  "Physics (remove it)")
    assert "no word from the theme's list" in removal and "steered 1 of 1" in removal
    assert Handlers._rule_note({"generations": gens}, "Tiny example") == ""


def test_demo_headline_says_how_many_theme_scores_are_uncertain():
    """Walkthrough (session 17): columns mark some samples "theme uncertain", while the headline's
    means silently counted their central values; the headline now says how many."""
    from types import SimpleNamespace as S

    from app_handlers import Handlers

    sure, unsure, off = S(available=True, uncertain=False), S(available=True, uncertain=True), S(available=False)
    assert Handlers._uncertain_note({"scores": [sure, sure, off]}) == ""
    note = Handlers._uncertain_note({"scores": [sure, unsure, unsure, off]})
    assert "uncertain for 2 of the 3 samples" in note


def test_a_seed_set_example_runs_in_the_demo_tab(app_fns):
    """A curated example may be a seed set ("a, b", demo_sweep's seed-set candidates): the Demo tab
    shows the merged flow graph of both seeds and steers with both."""
    fns, _ = app_fns
    fig, _, steered, _, gain, _ = last(fns["demo"]("Tiny pair"))
    assert f"features {TINY_FEATURE}, 2/res/5" in fig.layout.title.text
    pg = next(f for f in fns.values() if hasattr(f, "__self__") and hasattr(f.__self__, "pg")).__self__.pg
    ex = next(e for e in pg.examples if e.title == "Tiny pair")
    assert {str(x.feature) for x in pg.plan(ex.settings())} == {TINY_FEATURE, "2/res/5"}  # both are steered
    assert all(f in str(fig.to_dict()["data"]) for f in (TINY_FEATURE, "2/res/5"))  # both seeds' nodes
    assert "**seed " in steered and "Theme score" in gain


def test_playground_opens_at_the_first_examples_measured_setting(built_app, live_app):
    """The Playground's first run is the first curated example's measured setting (feature,
    condition, strength, prompt and theme, so it is scored and the asking control runs); the prompts a task change sets carry no trailing space (SmolLM2 continues
    "I think " with digits in about half of the samples)."""
    from app_handlers import Handlers
    from steering.settings import TASK_DEFAULTS
    from steering.ui import Playground

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FFP_DEMO_FILE", live_app["demo_file"])
        first = Playground.create(live_app["bundle"]).examples[0]
    comps = {c["props"].get("label", ""): c["props"].get("value") for c in built_app.get_config_file()["components"]}
    value = lambda start: next(v for k, v in comps.items() if k and k.startswith(start))  # noqa: E731
    assert value("Condition") == first.condition and value("Strength s") == first.strength
    assert value("Prompt") == (first.prompt or TASK_DEFAULTS["activate"]["prompt"].rstrip())
    assert value("Prompt").strip() and not value("Prompt").endswith(" ")
    assert value("Feature id") == first.feature and value("Theme for the judge") == first.theme  # scored at once
    # the card shown on page load keeps it (an example's theme, not one an earlier card set)
    load = next(d for d in built_app.get_config_file()["dependencies"]
                if getattr(built_app.fns[d["id"]].fn, "__name__", "") == "card_quiet" and d["targets"][0][1] == "load")
    fn = built_app.fns[load["id"]].fn
    _, kept_theme, _ = fn(first.feature, False, first.theme, "")
    assert kept_theme == first.theme or (isinstance(kept_theme, dict) and "value" not in kept_theme)
    for task in TASK_DEFAULTS:
        prompt, _ = Handlers.task_defaults(task)
        assert prompt == TASK_DEFAULTS[task]["prompt"].rstrip() and not prompt.endswith(" ")


def test_header_names_the_model_as_a_person_would():
    """The walkthrough read the header's "SmolLM2-135M-Instruct.Q4_1.gguf" as a file name."""
    from app import model_name

    assert model_name("SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct (Q4_1 weights)"
    assert model_name("google/gemma-2-2b") == "google/gemma-2-2b" and model_name("tiny.gguf") == "tiny.gguf"
