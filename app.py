"""Feature Flow Playground: pick a feature, see how it flows through the layers, steer with it.

    python app.py [--preset default|gemma-2-2b|path/to/preset.json] [--host 127.0.0.1] [--port 7860]

The model and SAEs are loaded once at start-up (console progress), never inside a handler.
This module holds the layout and wires each event to a method of `app_handlers.Handlers` (thin
calls into `steering.ui.Playground`); per-user values (an OpenAI key included) travel with each
request and are never stored. Model access is serialized (one queue slot for
every event that runs the model, plus the bundle's lock), since steering hooks are global.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import gradio as gr

from app_handlers import (FieldNumber, FieldSlider, Handlers, bounded_malloc, cleared, layer_after_pick, named,
                          pick_hit, pick_row, pick_token)
from steering import limits
from steering.bundle import Bundle, parse_max_memory
from steering.settings import (ALPHA, CONDITIONS, DEPRECATED_CONDITIONS, S_END, SCHEDULES, STRENGTH, T_MODULE, T_RES,
                               TASK_DEFAULTS, APP_PROMPTS)
from steering.ui import Playground

log = logging.getLogger("app")


NODE_HEADERS = ["feature", "layer", "site", "role", "score", "s(R)", "s(M)", "s(A)", "in span", "label"]
MODEL = {"concurrency_id": "model", "concurrency_limit": limits.MODEL_CONCURRENCY}  # events that run the model
# (several at once, so that concurrent /steer requests can be batched; each forward holds the model lock)
LIGHT = {"concurrency_id": "light", "concurrency_limit": 4}  # catalog / decoder look-ups only

SCORES_LABEL = "scores as a share of the best (theme /5, readability /5, metric 0-1)"
EXPLAIN = {
    "demo": "A language model stores ideas as *directions* inside its layers. A sparse autoencoder "
            "splits each layer into thousands of **features**, each firing on one recognisable idea "
            "(weddings, anger, code...). Pick an example and press the button: the model writes the same "
            "prompt twice with the same dice rolls, once on its own and once **steered**: the example's "
            "feature pushed up (on its own, at one layer, or along its flow through the layers) or, for a "
            "removal, turned down. The scores say how much each text is about the theme and how readable "
            "it stays.",
    "pick": "Search the feature catalog by words, or type a sentence and see which features fire on "
            "which tokens. Click a result to pick it, or type an id `layer/site/index` (several ids separated "
            "by commas steer a **seed set**: their flow graphs are merged, as in the paper's removal).",
    "flow": "The same idea is re-written by every layer. The **flow graph** follows a feature from layer "
            "to layer by matching SAE directions (cosine similarity): lanes are the residual stream, the "
            "MLP and attention; bigger, brighter nodes are closer matches. The shaded band is the span "
            "where every link has cosine >= t(R); faded nodes lie outside it.",
    "steer": "**Steering** adds the feature's direction to the model's activations while it writes. "
             "*seed-only* steers the picked feature only; *single layer* steers every flow-graph node at "
             "layer l; *cumulative* steers the whole flow from the start of the span to l with a strength "
             "that follows the schedule (the paper's exponential decay s·e^(alpha·l)). *Remove* scales "
             "the features down instead (r = 0 erases them, negative values push them away).",
    "compare": "Same prompt, same random seed per sample, one batch: only the steering differs. Theme "
               "and readability (the paper's coherence) are judged 0-5 (an LLM judge when an OpenAI key is "
               "given, otherwise the local **offline fallback judge**, labelled as such); metric = theme x "
               "readability for activation, (1 - theme) x readability for removal.",
}


# ---- the app ----------------------------------------------------------------------------------------

def build_app(pg: Playground, trim=lambda: None) -> gr.Blocks:
    """The Blocks app over a loaded playground (no model loading here): the layout, and each event
    wired to a method of `app_handlers.Handlers`. ``trim`` frees memory after each generation."""
    h = Handlers(pg, trim)
    bundle, examples = pg.bundle, pg.examples
    n_layers = bundle.n_layers
    default_feature = examples[0].feature if examples else f"{bundle.layers[len(bundle.layers) // 2]}/res/0"
    judge_name = "OpenAI judge (server key)" if not pg.judge.offline else "offline fallback judge (local, no key)"

    # ---- layout -----------------------------------------------------------------------------------
    lim = limits.limits_table()
    with gr.Blocks(title="Feature Flow Playground", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# Feature Flow Playground\nHow an idea travels through **{model_name(bundle.preset.model)}** "
                    f"({n_layers} layers), and how to steer the model with it. Preset `{bundle.preset.name}` · "
                    f"{bundle.device} · scores by the {judge_name}. Method: Laptev et al., *Analyze Feature Flow "
                    "to Enhance Interpretation and Steering in Language Models* (ICML 2025).")
        with gr.Tabs() as tabs:
            with gr.Tab("Demo", id="demo"):
                gr.Markdown(EXPLAIN["demo"])
                if examples:
                    demo_pick = gr.Radio([e.title for e in examples], value=examples[0].title,
                                         label="Pick an example", elem_id="demo-pick")
                    demo_expl = gr.Markdown(h.example_text(examples[0].title))
                    with gr.Row():
                        demo_run = gr.Button("Run this example", variant="primary", elem_id="demo-run")
                        demo_open = gr.Button("Open it in the Playground", elem_id="demo-open")
                    with gr.Accordion("All the fresh samples it was checked on (recorded by the demo sweep; "
                                      "a run shows the first few of them live)", open=False):
                        demo_evid = gr.Markdown(h.example_evidence(examples[0].title), elem_id="demo-evidence",
                                                latex_delimiters=[])
                    demo_gain = gr.Markdown(elem_id="demo-gain")
                    with gr.Row():
                        demo_base = gr.Markdown(elem_id="demo-unsteered", latex_delimiters=[])
                        demo_steer = gr.Markdown(elem_id="demo-steered", latex_delimiters=[])
                        demo_ctrl = gr.Markdown(elem_id="demo-controls", latex_delimiters=[])
                    with gr.Row():
                        demo_graph = gr.Plot(label="where the feature lives: its flow through the layers",
                                             elem_id="demo-graph")
                        demo_scores = gr.Plot(label=SCORES_LABEL)
                    gr.Markdown("*How to read the graph*: " + EXPLAIN["flow"] + "\n\n*How to read the scores*: "
                                + EXPLAIN["compare"])
                else:
                    gr.Markdown("No curated examples for this preset (assets/demo_examples.json): use the "
                                "**Playground** tab.")
            with gr.Tab("Playground", id="play"):
                carried = gr.Markdown(elem_id="carried")
                gr.Markdown("## 1. Pick a feature\n" + EXPLAIN["pick"])
                researcher = gr.Checkbox(label="Researcher view: raw labels (word pieces, logit-lens tokens after →)",
                                         value=False, elem_id="researcher")
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            query = gr.Textbox(label="Search words", placeholder="wedding, anger, football, python",
                                               scale=3, elem_id="search-box")
                            search_btn = gr.Button("Search", scale=1, elem_id="search-btn")
                        search_note = gr.Markdown(elem_id="search-note")
                        hits = gr.Dataframe(headers=["feature", "what it is about", "score", "why it matched"],
                                            interactive=False,
                                            label="Results, best match first (click a row to pick it)", max_height=480,
                                            wrap=True, column_widths=["18%", "44%", "10%", "28%"],
                                            elem_id="search-results")
                    with gr.Column():
                        with gr.Row():
                            probe = gr.Textbox(label="...or type a text and see which features fire",
                                               placeholder="The bride and groom cut the wedding cake.", scale=3,
                                               elem_id="probe-box")
                            probe_btn = gr.Button("Which features fire?", scale=1, elem_id="probe-btn")
                        probe_all = gr.Checkbox(label="Show everything: attention sinks, punctuation / function-word "
                                                "and dense features (hidden by default)", value=False,
                                                elem_id="probe-all")
                        probe_tokens = gr.HighlightedText(label="strongest feature per token (click one to pick it)",
                                                          combine_adjacent=False, show_legend=False,
                                                          elem_id="probe-tokens")
                        probe_rows = gr.Dataframe(headers=["feature", "label", "max act. (x typical)", "token"],
                                                  interactive=False, column_widths=["18%", "50%", "14%", "18%"],
                                                  label="Most active features (click a row to pick it)",
                                                  max_height=420, wrap=True)
                with gr.Row():
                    feature = gr.Textbox(label="Feature id (layer/site/index; several separated by commas: a seed "
                                         "set)", value=default_feature,
                                         elem_id="feature-id", scale=3)
                    card_btn = gr.Button("Show card", scale=1)
                card_md = gr.Markdown(elem_id="feature-card")
                gr.Markdown("## 2. Flow graph\n" + EXPLAIN["flow"])
                with gr.Row():
                    t_res = FieldSlider(0.0, 1.0, value=T_RES, step=0.05, label="t(R): span threshold")
                    t_module = FieldSlider(0.0, 1.0, value=T_MODULE, step=0.05,
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
                        # the first example's measured setting: its strength with another condition
                        # (Sport's s = 5 alone, applied cumulatively) turned every text into noise
                        condition = gr.Radio(list(CONDITIONS),
                                             value=examples[0].condition if examples else "cumulative",
                                             label="Condition (seed-only = the picked feature alone)")
                        layer = gr.Dropdown([("the seed's layer", -1)] + [(str(i), i) for i in range(n_layers)],
                                            value=-1, label="Layer l (single: steer there; cumulative: up to there)")
                        strength = FieldSlider(-limits.MAX_ABS_STRENGTH, limits.MAX_ABS_STRENGTH, step=0.5,
                                               value=examples[0].strength if examples else STRENGTH,
                                               label="Strength s (x the feature's typical activation)")
                        schedule = gr.Radio(list(SCHEDULES), value="exp", label="Schedule over layers (cumulative)")
                        alpha = FieldSlider(-limits.MAX_ABS_ALPHA, limits.MAX_ABS_ALPHA, step=0.01,
                                            value=examples[0].alpha if examples else ALPHA,
                                            label="Decay alpha (exp: s·e^(alpha·l))")
                        s_end = FieldSlider(-limits.MAX_ABS_STRENGTH, limits.MAX_ABS_STRENGTH, value=S_END, step=0.5,
                                            label="End value s* (linear)")
                        r = FieldSlider(-limits.MAX_ABS_R, limits.MAX_ABS_R, value=0, step=1,
                                        label="Rescale r (remove task; 0 erases)")
                        exclude = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                              label="Exclude nodes from steering")
                        include = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                              label="Also steer nodes outside the span")
                    with gr.Column():
                        preview_plot = gr.Plot(label="strength per layer (preview of the plan)", elem_id="plan-preview")
                        with gr.Accordion("Plan as a table", open=False):
                            plan_json = gr.JSON()
                        prompt = gr.Textbox(label="Prompt (the paper's for the task, without its trailing space, "
                                                  "which SmolLM2 continues with digits)",
                                            value=examples[0].prompt_or_default
                                            if examples and examples[0].task == "activate"
                                            else APP_PROMPTS["activate"])
                        # the first example's theme with its feature: a first Steer gets scores and the asking
                        # control (with an empty box every sample read "no theme given"); kept like a theme an
                        # example put there (auto_theme empty), replaced by a card whose label names a theme
                        first_theme = examples[0].theme if examples else ""
                        theme = gr.Textbox(first_theme, placeholder="e.g. weddings and marriage",
                                           label="Theme for the judge (filled from the feature; edit freely)")
                        auto_theme = gr.Textbox("", visible=False)  # the theme the last card set
                        with gr.Row():
                            seed = FieldNumber(value=examples[0].seed if examples else 0, precision=0, label="Seed",
                                               minimum=0, maximum=limits.MAX_SEED, elem_id="seed")
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
                run_prompt = gr.Markdown(elem_id="run-prompt")
                with gr.Row():
                    col_base = gr.Markdown(elem_id="col-unsteered", latex_delimiters=[])
                    col_steer = gr.Markdown(elem_id="col-steered", latex_delimiters=[])
                    col_other = gr.Markdown(visible=False, elem_id="col-other", latex_delimiters=[])
                    col_ctrl = gr.Markdown(visible=False, elem_id="col-controls", latex_delimiters=[])
                with gr.Row():
                    score_plot = gr.Plot(label=SCORES_LABEL)
                    record_file = gr.File(label="Run record (JSON: preset, hashes, versions, settings, texts, scores)")
                with gr.Accordion("Run record", open=False):
                    record_json = gr.JSON()
            with gr.Tab("About", id="about"):
                gr.Markdown(_about(pg, lim))

        # ---- events ---------------------------------------------------------------------------------
        for comp in (task, layer, schedule):
            named(comp)
        named(condition, aliases=DEPRECATED_CONDITIONS)  # the old name "baseline" still works for a release
        plan_inputs = [feature, t_res, t_module, task, condition, layer, strength, schedule, alpha, s_end, r, exclude,
                       include]
        steer_inputs = plan_inputs + [seed, samples, max_new, prompt, chat, theme, compare, api_key, controls, scope]
        searched = gr.on([search_btn.click, query.submit], h.search, [query, researcher], hits, api_name="search",
                         **LIGHT)
        searched.success(h.search_note, [query, hits], search_note, api_name=False, queue=False)
        searched.failure(cleared(2), None, [hits, search_note], api_name=False, queue=False)
        probe_outputs = [probe_tokens, probe_rows]
        gr.on([probe_btn.click, probe.submit], h.features_for_text, [probe, probe_all, researcher], probe_outputs,
              api_name="features_for_text", **MODEL).failure(cleared(2), None, probe_outputs, api_name=False,
                                                              queue=False)
        probe_all.change(h.features_for_text_again, [probe, probe_all, researcher], probe_outputs, api_name=False,
                         **MODEL)
        researcher.change(h.relabel, [hits, probe_rows, researcher], [hits, probe_rows], api_name=False, queue=False)
        researcher.change(h.card_view, [feature, researcher], card_md, api_name=False, **LIGHT)
        researcher.change(h.flow_relabel, [graph_json, live_prompt, researcher], [flow_plot, nodes, live_plot],
                          api_name=False, **MODEL)
        for picked in (hits.select(pick_hit, query, [feature, theme], api_name=False, queue=False),
                       probe_rows.select(pick_row, None, feature, api_name=False, queue=False),
                       probe_tokens.select(pick_token, None, feature, api_name=False, queue=False)):
            picked.then(layer_after_pick, [feature, layer, carried], [layer, carried], api_name=False, queue=False)
        feature.change(h.card_quiet, [feature, researcher, theme, auto_theme], [card_md, theme, auto_theme],
                       api_name=False, trigger_mode="always_last", **LIGHT)
        card_btn.click(h.card, [feature, researcher], [card_md, theme], api_name="card", **LIGHT)
        flowed = flow_btn.click(h.flow, [feature, t_res, t_module, live_prompt, researcher],
                                [flow_plot, nodes, graph_json, live_plot, exclude, include], api_name="flow", **MODEL)
        # the preview follows every input of the plan (a new feature or threshold too), before any graph is built
        for ctl in (feature, t_res, t_module, task, condition, layer, strength, schedule, alpha, s_end, r, exclude,
                    include):
            ctl.change(h.schedule_quiet, plan_inputs, [preview_plot, plan_json], api_name=False,
                       trigger_mode="always_last", show_progress="hidden", **LIGHT)
        # after the graph only: a bad id is one message, not one per event
        flowed.success(h.schedule, plan_inputs, [preview_plot, plan_json], api_name="schedule", show_progress="hidden",
                       **LIGHT)
        flowed.failure(cleared(5), None, [flow_plot, nodes, graph_json, preview_plot, plan_json], api_name=False,
                       queue=False)
        task.input(h.task_defaults, task, [prompt, max_new], api_name=False, queue=False)  # a user's change only
        run_outputs = [col_base, col_steer, col_other, score_plot, record_file, record_json, col_ctrl]
        steer_btn.click(h.prompt_line, [prompt, chat], run_prompt, api_name=False, queue=False)
        # progress on the scores plot (empty until the end), not over the columns streaming their texts
        steer_btn.click(h.steer, steer_inputs, run_outputs, api_name="steer", show_progress_on=[score_plot],
                        **MODEL).failure(
            cleared(8), None, run_outputs + [run_prompt], api_name=False, queue=False)
        if examples:
            demo_outputs = [demo_graph, demo_base, demo_steer, demo_scores, demo_gain, demo_ctrl]
            demo_pick.change(h.example_text, demo_pick, demo_expl, api_name=False, queue=False)
            demo_pick.change(h.example_evidence, demo_pick, demo_evid, api_name=False, queue=False)
            # another example: the last one's texts, graph and scores leave the screen
            demo_pick.change(cleared(6), None, demo_outputs, api_name=False, queue=False)
            demo_run.click(h.run_demo, demo_pick, demo_outputs, api_name="demo", show_progress_on=[demo_scores],
                           **MODEL).failure(
                cleared(6), None, demo_outputs, api_name=False, queue=False)
            demo_open.click(h.open_in_playground, demo_pick,
                            [tabs, feature, task, condition, layer, strength, schedule, alpha, s_end, r, prompt, theme,
                             samples, max_new, seed, t_res, t_module, chat, controls, scope, compare, exclude, include,
                             carried], api_name=False, queue=False)
        demo.load(h.card_quiet, [feature, researcher, theme, auto_theme], [card_md, theme, auto_theme], api_name=False,
                  **LIGHT)
        demo.load(h.schedule_quiet, plan_inputs, [preview_plot, plan_json], api_name=False, show_progress="hidden",
                  **LIGHT)  # the opening feature's plan, before its graph is built
        gr.api(h.health, api_name="health", queue=False)
    return demo


def model_name(model: str) -> str:
    """The model as a person names it: a GGUF file "SmolLM2-135M-Instruct.Q4_1.gguf" reads
    "SmolLM2-135M-Instruct (Q4_1 weights)"; a hub id stays as it is."""
    if model.endswith(".gguf") and "." in model[:-5]:
        name, quant = model[:-5].rsplit(".", 1)
        return f"{name} ({quant} weights)"
    return model


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
    trim = bounded_malloc()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # request lines would be noise
    from tqdm import tqdm

    log.info("loading preset %s", a.preset)
    bundle = Bundle.load(a.preset, device=a.device, progress=lambda it: tqdm(it, desc="loading SAEs"),
                         device_map=a.device_map or None, max_memory=parse_max_memory(a.max_memory))
    pg = Playground.create(bundle)
    log.info("ready: %s on %s, catalog %s, %d demo examples, judge %s", bundle.preset.name, bundle.device,
             "yes" if pg.catalog else "no", len(pg.examples), pg.judge.name)
    demo = build_app(pg, trim)
    demo.queue(default_concurrency_limit=1, max_size=limits.MAX_QUEUE)
    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=a.host, server_port=a.port, theme=theme, show_error=False, footer_links=["api"],
                run_history=False, quiet=False)


if __name__ == "__main__":
    main()
