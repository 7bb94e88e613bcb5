"""The app's event handlers (`Handlers`, one method per endpoint) and the gradio helpers they need:
inputs that name themselves in range errors (`named`) and error handling (`safe`). The layout and
the wiring of events live in app.py.

Handlers are thin calls into `steering.ui.Playground`; per-user values (an OpenAI key included)
travel with each request and are never stored.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import html
import inspect
import json
import logging
import os
import re
import statistics
import tempfile
import threading
from pathlib import Path

import gradio as gr

from steering import limits
from steering.flow import chance_levels
from steering.graph import FlowGraph, merge_graphs
from steering.plots import flow_figure, live_figure, schedule_figure, scores_figure
from steering.settings import ALPHA, APP_PROMPTS, S_END, STRENGTH, T_MODULE, T_RES, TASK_DEFAULTS
from steering.sites import count_hooks
from steering.ui import VARIANT_TITLES, DemoExample, Playground, evidence_markdown

log = logging.getLogger("app")


def bounded_malloc():
    """glibc only: at most 2 malloc arenas (otherwise every worker thread that allocates gets its
    own, and the app's RSS grows with the number of concurrent requests), and a function that
    hands freed memory back to the OS (called after each generation). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


# ---- inputs that name themselves in range errors ------------------------------------------------

def _num(x) -> str:
    """A number as a person reads it: integers in full (seed 2147483647, not 2.14748e+09)."""
    if isinstance(x, int):  # JSON integers can be longer than any float
        return str(x) if abs(x) < 10**21 else f"{'-' if x < 0 else ''}~10^{len(str(abs(x))) - 1}"
    return str(int(x)) if x.is_integer() and abs(x) < 1e21 else f"{x:g}"


def _range_error(label: str, value, lo, hi) -> gr.Error:
    return gr.Error(f"{label} = {_num(value)} is out of range; allowed: {_num(lo)}..{_num(hi)}", print_exception=False)


def named(component, aliases: dict | None = None):
    """Make an input's validation errors name the field (gradio's own messages do not): numbers
    out of range say the allowed range; other refusals (e.g. a value not among a Radio's choices)
    get the field's label in front. ``aliases`` maps deprecated values to current ones (logged).
    Wraps this instance's preprocess; a subclass would make gradio write a .pyi stub beside this file."""
    original = component.preprocess
    label = component.label or type(component).__name__

    def preprocess(payload):
        if aliases and isinstance(payload, str) and payload in aliases:
            log.warning("%s %r is deprecated; use %r", label, payload, aliases[payload])
            payload = aliases[payload]
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
    return ", ".join(f"{k}={'***' if 'key' in k else repr(v)[:80]}" for k, v in bound.items()
                     if k not in ("progress", "self"))


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
        except Exception as e:  # noqa: BLE001 - the app must keep serving; the error is logged
            raise refuse(e, args, kwargs) from None

    return wrapper


# ---- small event helpers ----------------------------------------------------------------------------

def write_record(folder: Path, stem: str, record: dict, keep: int = 256) -> Path:
    """Write a run record for download; only the newest ``keep`` records stay on disk."""
    path = folder / f"{stem}_{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(record, indent=1))
    for old in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _rows(table) -> list[list]:
    """The rows of a Dataframe's value (a pandas frame in a handler, a dict or a list over the API)."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return table.values.tolist()
    if isinstance(table, dict):
        return list(table.get("data") or [])
    return list(table)


def cleared(n: int):
    """A handler that empties ``n`` outputs: after a failed run no stale result stays on screen."""
    def clear():
        return tuple(None for _ in range(n)) if n > 1 else None

    return clear


def pick_token(evt: gr.SelectData):
    """Clicking a highlighted token picks the feature it is tagged with."""
    value = evt.value
    return value[1] if isinstance(value, (list, tuple)) and len(value) == 2 and value[1] else gr.update()


def pick_row(evt: gr.SelectData):
    """Clicking a result row picks its feature id (first column)."""
    row = getattr(evt, "row_value", None)
    return row[0] if row else gr.update()


def pick_hit(query: str, evt: gr.SelectData):
    """Clicking a search result picks its feature id and puts the search words in the judge theme;
    the card then replaces them with the feature's own words when its label names any (`card_quiet`)."""
    row = getattr(evt, "row_value", None)
    if not row:
        return gr.update(), gr.update()
    return row[0], (query or "").strip() or gr.update()


def layer_after_pick(feature: str, layer, carried: str):
    """After a click in a list (search, probe table or token): the layer goes back to the seed's
    layer (-1), since a steered layer must lie in the feature's own span (the Music example's layer
    27, carried into the Playground, refused every plan of a feature spanning 0-13); when an
    example's settings were carried, its note says so. Returns (layer, carried note) updates. A
    click that picks nothing (a token without a feature) resets the layer too: this runs after
    the pick and cannot see whether the id changed."""
    if layer in (-1, None, "-1"):
        return gr.update(), gr.update()
    note = (f"{carried}\n\n_You picked `{feature}`: the layer went back to the seed's layer; "
            "the other settings above still apply._") if carried else gr.update()
    return -1, note


# ---- the handlers -----------------------------------------------------------------------------------

class Handlers:
    """One method per endpoint of the app, over a loaded playground (read-only after start-up).

    ``trim`` hands freed memory back to the OS after each generation (`bounded_malloc`)."""

    def __init__(self, pg: Playground, trim=lambda: None):
        self.pg, self.bundle, self.examples, self.trim = pg, pg.bundle, pg.examples, trim
        self.record_dir = Path(tempfile.mkdtemp(prefix="ffp-records-"))
        self.lim = limits.limits_table()

    def example(self, title: str) -> DemoExample:
        ex = next((e for e in self.examples if e.title == title), None)
        if ex is None:
            raise ValueError(f"unknown example {title!r}; valid: {', '.join(e.title for e in self.examples)}")
        return ex

    def _graph_figure(self, graph, live=None, title=None, researcher: bool = False):
        """A flow graph's figure with the chance cosine of each layer pair (hover and colour bar) and
        node labels in the chosen view (whole words; raw in the researcher view)."""
        return flow_figure(graph, live, title=title, chance=chance_levels(self.bundle), d_model=self.bundle.d_model,
                           label=self.pg.node_label(bool(researcher)))

    # ---- picking a feature -------------------------------------------------------------------------
    @safe
    def search(self, query: str, researcher: bool = False):
        return self.pg.search(query, researcher=bool(researcher))

    def search_note(self, query: str, hits):
        """The line above the results: says plainly when the best result matches only weakly."""
        rows = _rows(hits)
        return self.pg.search_note(query or "", [float(r[2]) for r in rows if len(r) > 2 and r[2] is not None])

    def relabel(self, hits, probe_rows, researcher: bool = False):
        """The researcher view toggled: the same result tables, labels in the chosen view."""
        return self.pg.relabel(_rows(hits), bool(researcher)), self.pg.relabel(_rows(probe_rows), bool(researcher))

    @safe
    def features_for_text(self, text: str, show_all: bool = False, researcher: bool = False):
        return self.pg.text_features(text, show_all=bool(show_all), researcher=bool(researcher))

    def features_for_text_again(self, text: str, show_all: bool = False, researcher: bool = False):
        """The show-everything toggle: the probe again on the text typed (nothing while it is empty)."""
        if not (text or "").strip():
            return gr.update(), gr.update()
        return self.features_for_text(text, show_all, researcher)

    @safe
    def card(self, feature: str, researcher: bool = False):
        return self.pg.card_markdown(feature, bool(researcher))

    def card_quiet(self, feature: str, researcher: bool = False, theme: str = "", auto: str = ""):
        """The card while typing or picking: a half-typed id shows a hint in place, not an error toast.
        Returns (card, judge theme, automatic theme). The judge theme becomes the feature's own words;
        when its label names none, a theme that an earlier card set (``theme == auto``) is cleared,
        and one a person, a search or an example put there is kept."""
        try:
            md, own = self.pg.card_markdown(feature, bool(researcher))
        except ValueError as e:
            return f"_{html.escape(str(e), quote=False)}_", gr.update(), gr.update()
        if own:
            return md, own, own
        if (theme or "") == (auto or "") and theme:
            return md, "", ""
        return md, gr.update(), auto

    def card_view(self, feature: str, researcher: bool = False):
        """The card again when the researcher view is toggled (the judge theme is left as it is)."""
        return self.card_quiet(feature, researcher)[0]

    # ---- flow and plan -------------------------------------------------------------------------------
    def _flow_view(self, graphs: list, live_prompt: str, researcher: bool):
        """Figure, node rows, merged graph and live activations of a flow graph (or a seed set's)."""
        graph = merge_graphs(graphs)
        live = self.pg.live(graph, live_prompt) if live_prompt and live_prompt.strip() else None
        title = (f"Flow graphs of the seed set {', '.join(str(g.seed) for g in graphs)} (merged)"
                 if len(graphs) > 1 else None)
        return self._graph_figure(graph, live, title, researcher), self.pg.node_rows(graph, researcher), graph, live

    @safe
    def flow(self, feature: str, t_res: float = T_RES, t_module: float = T_MODULE, live_prompt: str = "",
             researcher: bool = False):
        """The flow graph (a seed set: its graphs merged in one figure, the JSON a list of graphs);
        labels in the hover and the table in the chosen view (raw only in the researcher view)."""
        graphs = self.pg.flows(feature, t_res, t_module)
        fig, rows, graph, live = self._flow_view(graphs, live_prompt, bool(researcher))
        ids = [str(n.id) for n in graph.nodes]
        cut = [str(n.id) for n in graph.nodes if not n.in_span]
        as_json = graph.to_json() if len(graphs) == 1 else [g.to_json() for g in graphs]
        return (fig, rows, as_json,
                gr.update(value=live_figure(live) if live else None, visible=bool(live)),
                gr.update(choices=ids, value=[]), gr.update(choices=cut, value=[]))

    def flow_relabel(self, graph_json, live_prompt: str = "", researcher: bool = False):
        """The researcher view toggled: the graph on screen drawn again (from its JSON, not rebuilt)
        with the labels of the chosen view, coloured by the live prompt now typed (if any); nothing
        while no graph is shown."""
        if not graph_json:
            return gr.update(), gr.update(), gr.update()
        items = graph_json if isinstance(graph_json, list) else [graph_json]
        fig, rows, _, live = self._flow_view([FlowGraph.from_json(d) for d in items], live_prompt, bool(researcher))
        return fig, rows, gr.update(value=live_figure(live) if live else None, visible=bool(live))

    @safe
    def schedule(self, feature, t_res=T_RES, t_module=T_MODULE, task="activate", condition="cumulative", layer=-1,
                 strength=STRENGTH, schedule="exp", alpha=ALPHA, s_end=S_END, r=0.0, exclude=(), include=()):
        s = self.pg.settings(feature, t_res=t_res, t_module=t_module, task=task, condition=condition, layer=layer,
                             strength=strength, schedule=schedule, alpha=alpha, s_end=s_end, r=r, exclude=exclude,
                             include=include)
        rows = self.pg.schedule_rows(self.pg.plan(s))
        return schedule_figure(rows), rows

    def schedule_quiet(self, *args):
        """Live preview on every control change: a plan that cannot be made is shown in the plot title."""
        try:
            return self.schedule(*args)
        except gr.Error as e:
            return schedule_figure([], title=f"no plan: {e.message}"[:120]), []

    # ---- steering ------------------------------------------------------------------------------------
    @safe
    def steer(self, feature, t_res=T_RES, t_module=T_MODULE, task="activate", condition="cumulative", layer=-1,
              strength=STRENGTH, schedule="exp", alpha=ALPHA, s_end=S_END, r=0.0, exclude=(), include=(), seed=0,
              samples=1, max_new_tokens=None, prompt=None, chat=False, theme="", compare=False, api_key=None,
              controls=(), scope="all", progress=gr.Progress()):
        """Generate unsteered vs steered text (and the other condition, and the controls); streams
        the columns while the texts are written. Every field is validated once, before any compute."""
        pg = self.pg
        s = pg.settings(feature, t_res=t_res, t_module=t_module, task=task, condition=condition, layer=layer,
                        strength=strength, schedule=schedule, alpha=alpha, s_end=s_end, r=r, exclude=exclude,
                        include=include, seed=seed, samples=samples, max_new_tokens=max_new_tokens, prompt=prompt,
                        chat=chat, theme=theme or "", compare=compare, controls=controls or (), scope=scope or "all")
        progress(0.05, desc="flow graph")
        seed = s.features[0]  # a seed set is named after its first feature
        variants = {"unsteered": [], "steered": pg.plan(s)}
        other = "single" if s.condition != "single" else "cumulative"
        if s.compare:
            variants[other] = pg.plan(s, other)
        progress(0.15, desc=f"generating {len(variants)} variants x {s.samples} samples in one batch")
        s = dataclasses.replace(s, theme=s.theme or pg.default_theme(str(seed)))

        def frame(partial, ctrl_now: str) -> tuple:  # the seven run outputs while the texts are written
            return (partial("unsteered"), partial("steered"),
                    gr.update(value=partial(other), visible=True) if s.compare else gr.update(),
                    gr.update(), gr.update(), gr.update(),
                    gr.update(value=ctrl_now, visible=bool(ctrl_now)) if ctrl_now else gr.update())

        result = yield from self._stream(s, variants, api_key or "", progress, frame)
        schedules = {k: pg.schedule_rows(v) for k, v in variants.items() if v}
        record = pg.run_record(s, schedules, result)
        path = write_record(self.record_dir, f"run_{seed.layer}_{seed.site}_{seed.index}", record)
        focus = str(seed)
        third = pg.column_markdown(result, other, focus) if s.compare else ""
        ctrl = "\n\n".join(pg.column_markdown(result, c, focus) for c in ("prompted", "random")
                            if c in result["variants"])
        self.trim()  # the batch's tensors are freed: give the memory back
        yield (pg.column_markdown(result, "unsteered", focus), pg.column_markdown(result, "steered", focus),
               gr.update(value=third, visible=s.compare), scores_figure(pg.summary(result), VARIANT_TITLES),
               str(path), record, gr.update(value=ctrl, visible=bool(ctrl)))

    def _stream(self, s, variants: dict, api_key: str, progress, frame):
        """Run the generation in a thread and yield ``frame(partial, controls)`` every 0.4 s with the
        texts written so far (``partial(variant)``: that column's markdown so far; ``controls``: the
        control columns written so far, "" before their first token); returns the result (per
        request: nothing is kept on the shared handlers). The Playground and the Demo tab stream
        through it (issue 17)."""
        pg = self.pg
        live: dict = {}  # (variant, seed) -> new token ids so far: the texts stream while they are written
        live_lock = threading.Lock()  # the generation thread writes it, this handler reads snapshots

        def on_tokens(names, rows):
            with live_lock:
                for name, row in zip(names, rows):
                    live[name] = list(row)

        box: dict = {}

        def work():
            try:
                box["result"] = pg.steer(variants, s, api_key, on_tokens=on_tokens)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the handler
                box["error"] = e

        expected = [c for c, wanted in (("prompted", "prompt" in s.controls and bool(s.theme)),
                                         ("random", "random" in s.controls)) if wanted]
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.4)
            with live_lock:
                now = dict(live)
            if now and worker.is_alive():
                step = max(len(r) for r in now.values())
                progress(0.15 + 0.8 * min(1.0, step / max(1, s.max_new_tokens)),
                         desc=f"writing: token {step} of {s.max_new_tokens}")
                # every requested control has its place from the first token on (the prompting
                # control is generated after the others: it would push the random one down)
                ctrl_now = "\n\n".join(pg.partial_markdown(now, c, s.max_new_tokens, s.task) for c in expected)
                yield frame(functools.partial(pg.partial_markdown, now, max_new_tokens=s.max_new_tokens,
                                              task=s.task), ctrl_now)
        if "error" in box:
            raise box["error"]
        return box["result"]

    @staticmethod
    def _perplexity_note(result: dict) -> str:
        """" (median perplexity 14 -> 43)": how surprising the unsteered model finds each column's
        texts, a finer view of readability than the offline coherence score (which gives most
        fluent-looking texts 5/5)."""
        med = {}
        for v in ("unsteered", "steered"):
            ppl = [g.metrics["perplexity"] for g in result["generations"]
                   if g.variant == v and g.metrics.get("perplexity") is not None]
            if ppl:
                med[v] = statistics.median(ppl)
        if len(med) < 2:
            return ""
        return f" (median perplexity under the unsteered model {med['unsteered']:.0f} -> {med['steered']:.0f})"

    @staticmethod
    def _uncertain_note(result: dict) -> str:
        """" The theme score is uncertain for 3 of the 8 samples (their column means count their
        central values)": the headline's means include samples each column marks as uncertain."""
        unsure = [s for s in result["scores"] if s.available and getattr(s, "uncertain", False)]
        n = sum(s.available for s in result["scores"])
        if not unsure:
            return ""
        return (f" The theme score is uncertain for {len(unsure)} of the {n} samples (marked in the columns; "
                "these means count their central values).")

    @staticmethod
    def _rule_note(result: dict, title: str) -> str:
        """The sweep's own rule on this run's texts (`demo_sweep.judge_samples`: a word of the theme's
        list in a readable text; for removal, none in a readable text), per column: a count anyone
        can check by reading, beside the offline judge's softer scores."""
        from steering.experiments.demo_sweep import MAX_PPL, MIN_DISTINCT2, judge_samples, theme_rule

        rule = theme_rule(title)
        if rule is None:
            return ""
        words, task = rule
        names = {"unsteered": "unsteered", "steered": "steered", "prompted": "asking the model",
                 "random": "random features" if task == "remove" else "random directions"}
        parts = []
        for v, name in names.items():
            gens = [g for g in result["generations"] if g.variant == v]
            if gens:
                hits = sum(x["hit"] for x in judge_samples(gens, words, task))
                parts.append(f"{name} {hits} of {len(gens)}")
        what = ("no word from the theme's list" if task == "remove" else "a word from the theme's list")
        return (f"\n\n**By the rule the example was chosen with** ({what}, perplexity <= {MAX_PPL:g}, "
                f"distinct-2 >= {MIN_DISTINCT2:g}): "
                + ", ".join(parts) + ".")

    # ---- the demo tab -------------------------------------------------------------------------------
    @safe
    def run_demo(self, title: str, progress=gr.Progress()):
        """Run a curated example: its flow graph first, then the four columns streamed while they
        are written (as the Playground's Steer), then the scores and the headline."""
        pg, ex = self.pg, self.example(title)
        s = ex.settings()
        progress(0.05, desc="flow graph")
        graph = merge_graphs(pg.flows(ex.feature))  # an example may be a seed set ("a, b")
        focus = ex.feature.split(",")[0].strip()  # the columns say how strongly the first seed fires
        variants = {"unsteered": [], "steered": pg.plan(s)}
        short = re.sub(r"\s*\(.*\)\s*$", "", ex.title)  # "Physics (remove it)" -> "Physics"
        figure = self._graph_figure(graph, title=f"Where '{short}' lives in the model "
                                                  f"(feature{'s' if ',' in ex.feature else ''} {ex.feature})")
        gain = pg.prompt_line(s.prompt, s.chat)  # above the columns
        yield figure, "", "", None, gain, ""  # the graph and the prompt while the texts are written
        progress(0.15, desc="writing the texts and the two controls")

        def frame(partial, ctrl_now: str) -> tuple:
            return gr.update(), partial("unsteered"), partial("steered"), gr.update(), gr.update(), ctrl_now

        result = yield from self._stream(s, variants, "", progress, frame)
        sm = pg.summary(result)
        if "steered" in sm and "unsteered" in sm:
            def th(v):
                return f"{sm[v]['behavioral'] * 5:.1f}/5" if v in sm else "n/a"

            removal = s.task == "remove"
            judge = "offline fallback judge" if result["judge"].startswith("offline") else result["judge"]
            gain += ("\n\n"
                     f"**Theme score** ({judge}"
                     f"{'; this example removes the theme: lower is the goal' if removal else ''}): "
                     f"{th('unsteered')} without steering -> "
                     f"**{th('steered')}** with it. Controls: asking the model"
                     f"{' not to mention it' if removal else ''} "
                     f"{th('prompted')}, random {'features' if removal else 'directions of the same size'} "
                     f"{th('random')}.{self._uncertain_note(result)} **Readability** (the paper's coherence): "
                     f"{sm['unsteered']['coherence'] * 5:.1f}/5 -> {sm['steered']['coherence'] * 5:.1f}/5"
                     f"{self._perplexity_note(result)}. "
                     "A different text alone proves nothing: compare with the controls."
                     + self._rule_note(result, ex.title))
        ctrl = "\n\n".join(pg.column_markdown(result, c, focus) for c in ("prompted", "random")
                            if c in result["variants"])
        self.trim()
        yield (figure, pg.column_markdown(result, "unsteered", focus), pg.column_markdown(result, "steered", focus),
               scores_figure(sm, VARIANT_TITLES), gain, ctrl)  # the graph again: an API client gets the last frame

    def example_text(self, title: str):
        ex = next((e for e in self.examples if e.title == title), None)
        return f"**{ex.title}** — {ex.explanation or ex.theme}" if ex else ""

    def example_evidence(self, title: str) -> str:
        """Every fresh sample the example was checked on, as recorded by the demo sweep (the run
        shows two of them, which can be its misses)."""
        return evidence_markdown(self.pg.evidence.get(title), shown=self.example(title).samples)

    def open_in_playground(self, title: str):
        """Every setting of the example's run into the Playground form, and a note saying what was carried."""
        ex = self.example(title)
        s = ex.settings()  # current names (an old "baseline" condition reads "seed-only")
        return (gr.Tabs(selected="play"), ex.feature, s.task, s.condition, -1 if s.layer is None else s.layer,
                s.strength, s.schedule, s.alpha, s.s_end, s.r, s.prompt, s.theme, s.samples, s.max_new_tokens, s.seed,
                s.t_res, s.t_module, s.chat, list(s.controls), s.scope, s.compare, [], [],
                self.pg.carried_markdown(ex.title, s))

    def prompt_line(self, prompt: str, chat: bool = False):
        """The prompt above the output columns, shown when a run starts."""
        return self.pg.prompt_line(prompt, bool(chat))

    @staticmethod
    def task_defaults(task: str):
        d = TASK_DEFAULTS.get(task)
        return (APP_PROMPTS[task], d["max_new_tokens"]) if d else (gr.update(), gr.update())

    def health(self) -> dict:
        """Server state for operators and load tests: steering hooks on the model (0 when idle), RSS,
        limits. Answers outside the queue."""
        return {"preset": self.bundle.preset.name, "device": str(self.bundle.device),
                "hooks": count_hooks(self.bundle.model), "rss_mb": round(rss_mb(), 1), "limits": self.lim}
