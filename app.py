"""Feature Flow Playground: pick a feature, see how it flows through the layers, steer with it.

    python app.py [--preset default|gemma-2-2b|path/to/preset.json] [--host 127.0.0.1] [--port 7860]

The model and SAEs are loaded once at start-up (console progress), never inside a handler.
Handlers are thin calls into `steering.ui.Playground`; per-user values (an OpenAI key included)
travel with each request and are never stored. Model access is serialized (one queue slot for
every event that runs the model, plus the bundle's lock), since steering hooks are global.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import html
import inspect
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import gradio as gr

from steering import limits
from steering.bundle import Bundle, parse_max_memory
from steering.generate import TASK_DEFAULTS
from steering.flow import chance_levels
from steering.sites import count_hooks
from steering.plots import flow_figure, live_figure, schedule_figure, scores_figure
from steering.steer import CONDITIONS, SCHEDULES
from steering.ui import VARIANT_TITLES, DemoExample, Playground

log = logging.getLogger("app")


def _bounded_malloc():
    """glibc only: at most 2 malloc arenas (otherwise every worker thread that allocates gets its
    own, and the app's RSS grows with the number of concurrent requests), and a function that
    hands freed memory back to the OS (called after each generation). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


_trim = lambda: None  # noqa: E731 - set by main()
NODE_HEADERS = ["feature", "layer", "site", "role", "score", "s(R)", "s(M)", "s(A)", "in span", "label"]
MODEL = {"concurrency_id": "model", "concurrency_limit": limits.MODEL_CONCURRENCY}  # events that run the model
# (several at once, so that concurrent /steer requests can be batched; each forward holds the model lock)
LIGHT = {"concurrency_id": "light", "concurrency_limit": 4}  # catalog / decoder look-ups only

EXPLAIN = {
    "demo": "A language model stores ideas as *directions* inside its layers. A sparse autoencoder "
            "splits each layer into thousands of **features**, each firing on one recognisable idea "
            "(weddings, anger, code...). Pick an example and press the button: the model writes the same "
            "prompt twice with the same dice rolls, once on its own and once with the feature **switched "
            "up** in every layer where it lives. The scores say how much each text is about the theme "
            "and how readable it stays.",
    "pick": "Search the feature catalog by words, or type a sentence and see which features fire on "
            "which tokens. Click a result to pick it, or type an id `layer/site/index`.",
    "flow": "The same idea is re-written by every layer. The **flow graph** follows a feature from layer "
            "to layer by matching SAE directions (cosine similarity): lanes are the residual stream, the "
            "MLP and attention; bigger, brighter nodes are closer matches. The shaded band is the span "
            "where every link has cosine >= t(R); faded nodes lie outside it.",
    "steer": "**Steering** adds the feature's direction to the model's activations while it writes. "
             "*initial* steers the picked feature only; *single layer* steers every flow-graph node at "
             "layer l; *cumulative* steers the whole flow from the start of the span to l with a strength "
             "that follows the schedule (the paper's exponential decay s·e^(alpha·l)). *Remove* scales "
             "the features down instead (r = 0 erases them, negative values push them away).",
    "compare": "Same prompt, same random seed per sample, one batch: only the steering differs. Theme "
               "and coherence are judged 0-5 (an LLM judge when an OpenAI key is given, otherwise the local "
               "**offline fallback judge**, labelled as such); metric = theme x coherence for activation, "
               "(1 - theme) x coherence for removal.",
}


# ---- inputs that name themselves in range errors ------------------------------------------------

def _num(x) -> str:
    """A number as a person reads it: integers in full (seed 2147483647, not 2.14748e+09)."""
    if isinstance(x, int):  # JSON integers can be longer than any float
        return str(x) if abs(x) < 10**21 else f"{'-' if x < 0 else ''}~10^{len(str(abs(x))) - 1}"
    return str(int(x)) if x.is_integer() and abs(x) < 1e21 else f"{x:g}"


def _range_error(label: str, value, lo, hi) -> gr.Error:
    return gr.Error(f"{label} = {_num(value)} is out of range; allowed: {_num(lo)}..{_num(hi)}", print_exception=False)


def named(component):
    """Make an input's validation errors name the field (gradio's own messages do not): numbers
    out of range say the allowed range; other refusals (e.g. a value not among a Radio's choices)
    get the field's label in front. Wraps this instance's preprocess; a subclass would make gradio
    write a .pyi stub beside this file."""
    original = component.preprocess
    label = component.label or type(component).__name__

    def preprocess(payload):
        lo, hi = getattr(component, "minimum", None), getattr(component, "maximum", None)
        if (isinstance(payload, (int, float)) and not isinstance(payload, bool) and lo is not None
                and hi is not None and not lo <= payload <= hi):
            raise _range_error(label, payload, lo, hi)
        try:
            return original(payload)
        except gr.Error as e:
            raise gr.Error(f"{label}: {html.escape(str(e.message), quote=False)}", print_exception=False) from None

    component.preprocess = preprocess
    return component


def FieldSlider(*args, **kwargs) -> gr.Slider:  # noqa: N802 - reads like the component it builds
    return named(gr.Slider(*args, **kwargs))


def FieldNumber(*args, **kwargs) -> gr.Number:  # noqa: N802
    return named(gr.Number(*args, **kwargs))


# ---- error handling -------------------------------------------------------------------------------

def _context(fn, args, kwargs) -> str:
    """Handler arguments for the log, secrets masked and long values cut."""
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return "(unbindable arguments)"
    return ", ".join(f"{k}={'***' if 'key' in k else repr(v)[:80]}" for k, v in bound.items() if k != "progress")


def _redact(message: str, args, kwargs) -> str:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, str) and len(v) >= 8 and v in message and v.startswith("sk-"):
            message = message.replace(v, "***")
    return message


def safe(fn):
    """Bad input -> a short gr.Error naming the field; anything else is logged with context
    (secrets masked) and shown as one line, never a stack trace."""

    def refuse(e, args, kwargs):
        if isinstance(e, (ValueError, KeyError, FileNotFoundError)):
            msg = str(e.args[0] if e.args else e)
            log.info("%s refused: %s", fn.__name__, _redact(msg, args, kwargs)[:300])
            return gr.Error(html.escape(_redact(msg, args, kwargs)[:400], quote=False), print_exception=False)
        log.exception("handler %s failed (%s)", fn.__name__, _context(fn, args, kwargs))
        return gr.Error("Something went wrong on the server (it was logged). Try again or change the inputs.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):  # a streaming handler: the same rules for whatever it raises
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the app must keep serving; the error is logged
                raise refuse(e, args, kwargs) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, KeyError, FileNotFoundError) as e:
            msg = str(e.args[0] if e.args else e)
            log.info("%s refused: %s", fn.__name__, _redact(msg, args, kwargs)[:300])
            raise gr.Error(html.escape(_redact(msg, args, kwargs)[:400], quote=False), print_exception=False) from None
        except Exception:  # noqa: BLE001 - the app must keep serving; the error is logged
            log.exception("handler %s failed (%s)", fn.__name__, _context(fn, args, kwargs))
            raise gr.Error("Something went wrong on the server (it was logged). Try again or change the inputs.",
                           print_exception=False) from None

    return wrapper


# ---- the app ----------------------------------------------------------------------------------------

def build_app(pg: Playground) -> gr.Blocks:
    """The Blocks app over a loaded playground (no model loading here)."""
    bundle, examples = pg.bundle, pg.examples
    n_layers = bundle.n_layers
    record_dir = Path(tempfile.mkdtemp(prefix="ffp-records-"))
    default_feature = examples[0].feature if examples else f"{bundle.layers[len(bundle.layers) // 2]}/res/0"
    judge_name = "OpenAI judge (server key)" if not pg.judge.offline \
        else "offline fallback judge (local, no key)"

    # ---- handlers: thin calls into the playground -------------------------------------------------
    @safe
    def search(query: str):
        return pg.search(query)

    @safe
    def features_for_text(text: str):
        return pg.text_features(text)

    @safe
    def card(feature: str):
        return pg.card_markdown(feature)

    @safe
    def flow(feature: str, t_res: float, t_module: float, live_prompt: str):
        graph = pg.flow(feature, t_res, t_module)
        live = pg.live(graph, live_prompt) if live_prompt and live_prompt.strip() else None
        ids = [str(n.id) for n in graph.nodes]
        cut = [str(n.id) for n in graph.nodes if not n.in_span]
        return (flow_figure(graph, live, chance=chance_levels(bundle)), pg.node_rows(graph), graph.to_json(),
                gr.update(value=live_figure(live) if live else None, visible=bool(live)),
                gr.update(choices=ids, value=[]), gr.update(choices=cut, value=[]))

    def card_quiet(feature: str):
        """The card while typing or picking: a half-typed id shows a hint in place, not an error toast."""
        try:
            return pg.card_markdown(feature)
        except ValueError as e:
            return f"_{html.escape(str(e), quote=False)}_", gr.update()

    def schedule_quiet(*args):
        """Live preview on every control change: a plan that cannot be made is shown in the plot title."""
        try:
            return schedule(*args)
        except gr.Error as e:
            return schedule_figure([], title=f"no plan: {e.message}"[:120]), []

    @safe
    def schedule(feature, t_res, t_module, task, condition, layer, strength, sched, alpha, s_end, r, exclude,
                 include):
        graph = pg.flow(feature, t_res, t_module)
        rows = pg.schedule_rows(pg.plan(graph, task, condition, layer, strength, sched, alpha, s_end, r, exclude,
                                        include))
        return schedule_figure(rows), rows

    @safe
    def steer(feature, t_res, t_module, task, condition, layer, strength, sched, alpha, s_end, r, exclude, include,
              seed, samples, max_new_tokens, prompt, chat, theme, compare, api_key, controls=(), scope="all",
              progress=gr.Progress()):
        pg.check_generation(prompt, seed, samples, max_new_tokens, theme)  # refuse before any compute
        progress(0.05, desc="flow graph")
        graph = pg.flow(feature, t_res, t_module)
        args = (task, layer, strength, sched, alpha, s_end, r, exclude, include)
        variants = {"unsteered": [], "steered": pg.plan(graph, task, condition, *_plan_args(args))}
        other = "single" if condition != "single" else "cumulative"
        if compare:
            variants[other] = pg.plan(graph, task, other, *_plan_args(args))
        progress(0.15, desc=f"generating {len(variants)} variants x {int(samples)} samples in one batch")
        theme = (theme or "").strip() or pg.default_theme(str(graph.seed))
        live: dict = {}  # (variant, seed) -> new token ids so far: the texts stream while they are written
        live_lock = threading.Lock()  # the generation thread writes it, this handler reads snapshots

        def on_tokens(names, rows):
            with live_lock:
                for name, row in zip(names, rows):
                    live[name] = list(row)

        box: dict = {}

        def work():
            try:
                box["result"] = pg.steer(variants, task, prompt, seed, samples, max_new_tokens, theme, api_key or "",
                                         chat, tuple(controls or ()), on_tokens=on_tokens, scope=scope or "all")
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the handler
                box["error"] = e

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.4)
            with live_lock:
                now = dict(live)
            if now and worker.is_alive():
                step = max(len(r) for r in now.values())
                progress(0.15 + 0.8 * min(1.0, step / max(1, int(max_new_tokens))),
                         desc=f"writing: token {step} of {int(max_new_tokens)}")
                ctrl_now = "\n\n".join(pg.partial_markdown(now, c) for c in ("prompted", "random")
                                        if any(n == c for n, _ in now))
                yield (pg.partial_markdown(now, "unsteered"), pg.partial_markdown(now, "steered"),
                       gr.update(value=pg.partial_markdown(now, other), visible=bool(compare)) if compare
                       else gr.update(), gr.update(), gr.update(), gr.update(),
                       gr.update(value=ctrl_now, visible=bool(ctrl_now)) if ctrl_now else gr.update())
        if "error" in box:
            raise box["error"]
        result = box["result"]
        settings = {"task": task, "condition": condition, "layer": layer, "strength": strength, "schedule": sched,
                    "alpha": alpha, "s_end": s_end, "r": r, "exclude": exclude, "include": include, "seed": seed,
                    "samples": samples, "max_new_tokens": max_new_tokens, "chat": chat, "compare": compare,
                    "t_res": t_res, "t_module": t_module, "controls": list(controls or ()), "theme": theme,
                    "scope": scope or "all"}
        schedules = {k: pg.schedule_rows(v) for k, v in variants.items() if v}
        record = pg.run_record(feature.strip(), settings, schedules, result)
        path = _write_record(record_dir, f"run_{graph.seed.layer}_{graph.seed.site}_{graph.seed.index}", record)
        focus = str(graph.seed)
        third = pg.column_markdown(result, other, focus) if compare else ""
        ctrl = "\n\n".join(pg.column_markdown(result, c, focus) for c in ("prompted", "random")
                            if c in result["variants"])
        _trim()  # the batch's tensors are freed: give the memory back
        yield (pg.column_markdown(result, "unsteered", focus), pg.column_markdown(result, "steered", focus),
               gr.update(value=third, visible=bool(compare)), scores_figure(pg.summary(result), VARIANT_TITLES),
               str(path), record, gr.update(value=ctrl, visible=bool(ctrl)))

    @safe
    def run_demo(title: str, progress=gr.Progress()):
        ex = _example(examples, title)
        progress(0.05, desc="flow graph")
        graph = pg.flow(ex.feature)
        variants = {"unsteered": [], "steered": pg.plan(graph, ex.task, ex.condition, ex.layer, ex.strength, "exp",
                                                        ex.alpha, 1.0, ex.r)}
        progress(0.15, desc="writing the texts and the two controls")
        result = pg.steer(variants, ex.task, ex.prompt_or_default, ex.seed, ex.samples, ex.max_new_tokens, ex.theme,
                          controls=("prompt", "random"))
        s = pg.summary(result)
        gain = ""
        if "steered" in s and "unsteered" in s:
            def th(v):
                return f"{s[v]['behavioral'] * 5:.1f}/5" if v in s else "n/a"

            gain = (f"**Theme score** ({result['judge']}): {th('unsteered')} without steering -> "
                    f"**{th('steered')}** with it. Controls: asking the model {th('prompted')}, random "
                    f"directions of the same size {th('random')}. **Readability**: "
                    f"{s['unsteered']['coherence'] * 5:.1f}/5 -> {s['steered']['coherence'] * 5:.1f}/5. "
                    "A different text alone proves nothing: compare with the controls.")
        ctrl = "\n\n".join(pg.column_markdown(result, c, ex.feature) for c in ("prompted", "random")
                            if c in result["variants"])
        return (flow_figure(graph, title=f"Where '{ex.title}' lives in the model (feature {graph.seed})",
                            chance=chance_levels(bundle)),
                pg.column_markdown(result, "unsteered", ex.feature), pg.column_markdown(result, "steered", ex.feature),
                scores_figure(s, VARIANT_TITLES), gain, ctrl)

    def example_text(title: str):
        ex = next((e for e in examples if e.title == title), None)
        return f"**{ex.title}** — {ex.explanation or ex.theme}" if ex else ""

    def open_in_playground(title: str):
        ex = _example(examples, title)
        return (gr.Tabs(selected="play"), ex.feature, ex.task, ex.condition, ex.strength, ex.alpha, ex.r,
                ex.prompt_or_default, ex.theme, ex.samples, ex.max_new_tokens, ex.seed)

    def task_defaults(task: str):
        d = TASK_DEFAULTS.get(task)
        return (d["prompt"], d["max_new_tokens"]) if d else (gr.update(), gr.update())

    # ---- layout -----------------------------------------------------------------------------------
    lim = limits.limits_table()
    with gr.Blocks(title="Feature Flow Playground", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# Feature Flow Playground\nHow an idea travels through **{bundle.preset.model}** "
                    f"({n_layers} layers), and how to steer the model with it. Preset `{bundle.preset.name}` · "
                    f"{bundle.device} · scores by the {judge_name}. Method: Laptev et al., *Analyze Feature Flow "
                    "to Enhance Interpretation and Steering in Language Models* (ICML 2025).")
        with gr.Tabs() as tabs:
            with gr.Tab("Demo", id="demo"):
                gr.Markdown(EXPLAIN["demo"])
                if examples:
                    demo_pick = gr.Radio([e.title for e in examples], value=examples[0].title,
                                         label="Pick an example", elem_id="demo-pick")
                    demo_expl = gr.Markdown(example_text(examples[0].title))
                    with gr.Row():
                        demo_run = gr.Button("Run this example", variant="primary", elem_id="demo-run")
                        demo_open = gr.Button("Open it in the Playground", elem_id="demo-open")
                    demo_gain = gr.Markdown()
                    with gr.Row():
                        demo_base = gr.Markdown(elem_id="demo-unsteered")
                        demo_steer = gr.Markdown(elem_id="demo-steered")
                        demo_ctrl = gr.Markdown(elem_id="demo-controls")
                    with gr.Row():
                        demo_graph = gr.Plot(label="where the feature lives: its flow through the layers",
                                             elem_id="demo-graph")
                        demo_scores = gr.Plot(label="scores (0-1)")
                    gr.Markdown("*How to read the graph*: " + EXPLAIN["flow"] + "\n\n*How to read the scores*: "
                                + EXPLAIN["compare"])
                else:
                    gr.Markdown("No curated examples for this preset (assets/demo_examples.json): use the "
                                "**Playground** tab.")
            with gr.Tab("Playground", id="play"):
                gr.Markdown("## 1. Pick a feature\n" + EXPLAIN["pick"])
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            query = gr.Textbox(label="Search words", placeholder="wedding, anger, football, python",
                                               scale=3, elem_id="search-box")
                            search_btn = gr.Button("Search", scale=1, elem_id="search-btn")
                        hits = gr.Dataframe(headers=["feature", "label", "score", "matched"], interactive=False,
                                            label="Results (click a row to pick it)", max_height=300, wrap=True,
                                            elem_id="search-results")
                    with gr.Column():
                        with gr.Row():
                            probe = gr.Textbox(label="...or type a text and see which features fire",
                                               placeholder="The bride and groom cut the wedding cake.", scale=3,
                                               elem_id="probe-box")
                            probe_btn = gr.Button("Which features fire?", scale=1, elem_id="probe-btn")
                        probe_tokens = gr.HighlightedText(label="strongest feature per token (click one to pick it)",
                                                          combine_adjacent=False, show_legend=False,
                                                          elem_id="probe-tokens")
                        probe_rows = gr.Dataframe(headers=["feature", "label", "max act. (x typical)", "token"],
                                                  interactive=False,
                                                  label="Most active features (click a row to pick it)",
                                                  max_height=220, wrap=True)
                with gr.Row():
                    feature = gr.Textbox(label="Feature id (layer/site/index)", value=default_feature,
                                         elem_id="feature-id", scale=3)
                    card_btn = gr.Button("Show card", scale=1)
                card_md = gr.Markdown(elem_id="feature-card")
                gr.Markdown("## 2. Flow graph\n" + EXPLAIN["flow"])
                with gr.Row():
                    t_res = FieldSlider(0.0, 1.0, value=0.5, step=0.05, label="t(R): span threshold")
                    t_module = FieldSlider(0.0, 1.0, value=0.15, step=0.05,
                                           label="t(M/A): keep MLP/attention nodes above")
                    live_prompt = gr.Textbox(label="Optional: colour nodes by their activation on this prompt",
                                             placeholder="The bride and groom cut the wedding cake.", scale=2)
                flow_btn = gr.Button("Build flow graph", variant="primary", elem_id="flow-btn")
                flow_plot = gr.Plot(label="flow graph", elem_id="flow-plot")
                live_plot = gr.Plot(label="live activation of each node per token", visible=False)
                with gr.Accordion("Nodes as a table", open=False):
                    nodes = gr.Dataframe(headers=NODE_HEADERS, interactive=False, wrap=True)
                with gr.Accordion("Graph as JSON (same as `python -m steering flow`)", open=False):
                    graph_json = gr.JSON()
                gr.Markdown("## 3. Steer\n" + EXPLAIN["steer"])
                with gr.Row():
                    with gr.Column():
                        task = gr.Radio(list(TASK_DEFAULTS), value="activate", label="Task: amplify or remove")
                        condition = gr.Radio(list(CONDITIONS), value="cumulative",
                                             label="Condition (baseline = initial feature only)")
                        layer = gr.Dropdown([("the seed's layer", -1)] + [(str(i), i) for i in range(n_layers)],
                                            value=-1, label="Layer l (single: steer there; cumulative: up to there)")
                        strength = FieldSlider(-limits.MAX_ABS_STRENGTH, limits.MAX_ABS_STRENGTH, step=0.5,
                                               value=examples[0].strength if examples else 3.0,
                                               label="Strength s (x the feature's typical activation)")
                        sched = gr.Radio(list(SCHEDULES), value="exp", label="Schedule over layers (cumulative)")
                        alpha = FieldSlider(-limits.MAX_ABS_ALPHA, limits.MAX_ABS_ALPHA, step=0.01,
                                            value=examples[0].alpha if examples else -0.25,
                                            label="Decay alpha (exp: s·e^(alpha·l))")
                        s_end = FieldSlider(-limits.MAX_ABS_STRENGTH, limits.MAX_ABS_STRENGTH, value=1.0, step=0.5,
                                            label="End value s* (linear)")
                        r = FieldSlider(-limits.MAX_ABS_R, limits.MAX_ABS_R, value=0, step=1,
                                        label="Rescale r (remove task; 0 erases)")
                        exclude = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                              label="Exclude nodes from steering")
                        include = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                              label="Also steer nodes outside the span")
                    with gr.Column():
                        preview_plot = gr.Plot(label="strength per layer (preview of the plan)")
                        with gr.Accordion("Plan as a table", open=False):
                            plan_json = gr.JSON()
                        prompt = gr.Textbox(label="Prompt (the paper's prompt for the task by default)",
                                            value=TASK_DEFAULTS["activate"]["prompt"])
                        theme = gr.Textbox(label="Theme for the judge (filled from the feature; edit freely)",
                                           placeholder="e.g. weddings and marriage")
                        with gr.Row():
                            seed = FieldNumber(value=0, precision=0, label="Seed", minimum=0, maximum=limits.MAX_SEED)
                            samples = FieldSlider(1, limits.MAX_SAMPLES, value=2, step=1, label="Samples")
                            max_new = FieldSlider(1, limits.MAX_NEW_TOKENS, value=TASK_DEFAULTS["activate"]
                                                  ["max_new_tokens"], step=1, label="Max new tokens")
                        gr.Markdown(f"<small>Per-request budget: columns (variants and controls) x samples x "
                                    f"(prompt + new tokens) <= {limits.MAX_COST:,} token-rows, about 30 s on "
                                    "2 CPU cores, so no run holds the queue for long.</small>")
                        with gr.Row():
                            chat = gr.Checkbox(label="Use the chat template", value=False)
                            compare = gr.Checkbox(label="Third column: the other condition (single vs cumulative)",
                                                  value=False)
                        scope = gr.Radio([("prompt and generated tokens (the paper)", "all"),
                                          ("prompt only", "prompt"), ("generated tokens only", "generated")],
                                         value="all", label="Steer which tokens (attention sinks never)",
                                         elem_id="scope")
                        controls = gr.CheckboxGroup([("ask the model for the theme", "prompt"),
                                                     ("random directions, same layers and norms", "random")],
                                                    value=["prompt", "random"], elem_id="controls",
                                                    label="Controls (is it the feature, or would anything do?)")
                        api_key = gr.Textbox(label="OpenAI API key (optional; this request only, never stored)",
                                             type="password", elem_id="api-key")
                        gr.Markdown(f"<small>Limits: at most {lim['max_new_tokens']} new tokens, "
                                    f"{lim['max_samples']} samples, {lim['max_prompt_tokens']} prompt tokens "
                                    f"({lim['max_prompt_chars']} characters), |s| <= {lim['max_abs_strength']:g}, "
                                    f"|alpha| <= {lim['max_abs_alpha']:g}, |r| <= {lim['max_abs_r']:g}; "
                                    f"{lim['max_queue']} requests queued at most.</small>")
                        steer_btn = gr.Button("Generate unsteered vs steered", variant="primary", elem_id="steer-btn")
                gr.Markdown("## 4. Compare\n" + EXPLAIN["compare"])
                with gr.Row():
                    col_base = gr.Markdown(elem_id="col-unsteered")
                    col_steer = gr.Markdown(elem_id="col-steered")
                    col_other = gr.Markdown(visible=False, elem_id="col-other")
                    col_ctrl = gr.Markdown(visible=False, elem_id="col-controls")
                with gr.Row():
                    score_plot = gr.Plot(label="scores (0-1)")
                    record_file = gr.File(label="Run record (JSON: preset, hashes, versions, settings, texts, scores)")
                with gr.Accordion("Run record", open=False):
                    record_json = gr.JSON()
            with gr.Tab("About", id="about"):
                gr.Markdown(_about(pg, lim))

        # ---- events ---------------------------------------------------------------------------------
        for comp in (task, condition, layer, sched):
            named(comp)
        plan_inputs = [feature, t_res, t_module, task, condition, layer, strength, sched, alpha, s_end, r, exclude,
                       include]
        steer_inputs = plan_inputs + [seed, samples, max_new, prompt, chat, theme, compare, api_key, controls, scope]
        search_btn.click(search, query, hits, api_name="search", **LIGHT)
        query.submit(search, query, hits, api_name=False, **LIGHT)
        probe_btn.click(features_for_text, probe, [probe_tokens, probe_rows], api_name="features_for_text", **MODEL)
        probe.submit(features_for_text, probe, [probe_tokens, probe_rows], api_name=False, **MODEL)
        hits.select(_pick, None, feature, api_name=False, queue=False)
        probe_rows.select(_pick, None, feature, api_name=False, queue=False)
        probe_tokens.select(_pick_token, None, feature, api_name=False, queue=False)
        feature.change(card_quiet, feature, [card_md, theme], api_name=False, trigger_mode="always_last", **LIGHT)
        card_btn.click(card, feature, [card_md, theme], api_name="card", **LIGHT)
        flow_btn.click(flow, [feature, t_res, t_module, live_prompt],
                       [flow_plot, nodes, graph_json, live_plot, exclude, include], api_name="flow", **MODEL)
        for ctl in (task, condition, layer, strength, sched, alpha, s_end, r, exclude, include):
            ctl.change(schedule_quiet, plan_inputs, [preview_plot, plan_json], api_name=False,
                       trigger_mode="always_last", show_progress="hidden", **LIGHT)
        flow_btn.click(schedule, plan_inputs, [preview_plot, plan_json], api_name="schedule",
                       show_progress="hidden", **LIGHT)
        task.change(task_defaults, task, [prompt, max_new], api_name=False, queue=False)
        steer_btn.click(steer, steer_inputs, [col_base, col_steer, col_other, score_plot, record_file, record_json,
                                              col_ctrl], api_name="steer", **MODEL)
        if examples:
            demo_pick.change(example_text, demo_pick, demo_expl, api_name=False, queue=False)
            demo_run.click(run_demo, demo_pick, [demo_graph, demo_base, demo_steer, demo_scores, demo_gain,
                                                 demo_ctrl], api_name="demo", **MODEL)
            demo_open.click(open_in_playground, demo_pick, [tabs, feature, task, condition, strength, alpha, r, prompt,
                                                            theme, samples, max_new, seed], api_name=False, queue=False)
        demo.load(card_quiet, feature, [card_md, theme], api_name=False, **LIGHT)

        def health() -> dict:
            """Server state for operators and load tests: steering hooks on the model (0 when idle), RSS,
            limits. Answers outside the queue."""
            return {"preset": bundle.preset.name, "device": str(bundle.device), "hooks": count_hooks(bundle.model),
                    "rss_mb": round(rss_mb(), 1), "limits": lim}

        gr.api(health, api_name="health", queue=False)
    return demo


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def _plan_args(args):
    task, layer, strength, sched, alpha, s_end, r, exclude, include = args
    return layer, strength, sched, alpha, s_end, r, exclude, include


def _write_record(folder: Path, stem: str, record: dict, keep: int = 256) -> Path:
    """Write a run record for download; only the newest ``keep`` records stay on disk."""
    path = folder / f"{stem}_{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(record, indent=1))
    for old in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _pick_token(evt: gr.SelectData):
    """Clicking a highlighted token picks the feature it is tagged with."""
    value = evt.value
    return value[1] if isinstance(value, (list, tuple)) and len(value) == 2 and value[1] else gr.update()


def _example(examples: list[DemoExample], title: str) -> DemoExample:
    ex = next((e for e in examples if e.title == title), None)
    if ex is None:
        raise ValueError(f"unknown example {title!r}; valid: {', '.join(e.title for e in examples)}")
    return ex


def _pick(evt: gr.SelectData):
    """Clicking a result row picks its feature id (first column)."""
    row = getattr(evt, "row_value", None)
    return row[0] if row else gr.update()


def _about(pg: Playground, lim: dict) -> str:
    info = pg.bundle.info()
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in lim.items())
    return (f"### Limits (steering/limits.py)\n| limit | value |\n|---|---|\n{rows}\n\n"
            f"### Preset\n```json\n{json.dumps(info, indent=2, default=str)}\n```\n"
            f"Model hash: `{pg.hashes.get('model')}`\n\n"
            "### API\nEvery button is an API endpoint (`/search`, `/features_for_text`, `/card`, `/flow`, "
            "`/schedule`, `/steer`, `/demo`): see *Use via API* at the bottom of the page and the README.\n\n"
            "### Privacy\nAn OpenAI key typed here is used for that request only: it is not stored, logged, "
            "exported in run records, or shared with other sessions; run history in the browser is off.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Feature Flow Playground")
    p.add_argument("--preset", default=os.environ.get("FFP_PRESET", "default"),
                   help="preset name or preset.json path (env FFP_PRESET; default: %(default)s)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--device-map", default=os.environ.get("FFP_DEVICE_MAP"),
                   help="accelerate device_map for big presets, e.g. auto (env FFP_DEVICE_MAP)")
    p.add_argument("--max-memory", default=os.environ.get("FFP_MAX_MEMORY"),
                   help="with --device-map: e.g. 0=20GiB,1=20GiB,cpu=64GiB (env FFP_MAX_MEMORY)")
    a = p.parse_args(argv)
    global _trim
    _trim = _bounded_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # request lines would be noise
    from tqdm import tqdm

    log.info("loading preset %s", a.preset)
    bundle = Bundle.load(a.preset, device=a.device, progress=lambda it: tqdm(it, desc="loading SAEs"),
                         device_map=a.device_map or None, max_memory=parse_max_memory(a.max_memory))
    pg = Playground.create(bundle)
    log.info("ready: %s on %s, catalog %s, %d demo examples, judge %s", bundle.preset.name, bundle.device,
             "yes" if pg.catalog else "no", len(pg.examples), pg.judge.name)
    demo = build_app(pg)
    demo.queue(default_concurrency_limit=1, max_size=limits.MAX_QUEUE)
    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=a.host, server_port=a.port, theme=theme, show_error=False, footer_links=["api"],
                run_history=False, quiet=False)


if __name__ == "__main__":
    main()
