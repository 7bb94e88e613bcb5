"""What the app does behind each button: library calls in, display-ready values out.

No gradio here (app.py owns the widgets). Functions raise ValueError naming the field and the
allowed range for bad input (the app shows those as short messages) and hold no per-user
state: everything a request needs comes in as arguments, so concurrent sessions never share
mutable values. `Playground` is built once at start-up and only read afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import limits
from .bundle import Bundle, file_sha256, package_dir
from .catalog import Catalog
from .catalog.labels import judge_theme
from .catalog.search import GOOD_SCORE, matches_by_word
from .features import FeatureId, parse_feature
from .flow import build_flow_graph
from .batching import GenerationBatcher
from .controls import generate_with_controls, instruction
from .graph import FlowGraph
from .groups import live_activations
from .judging import Judge, OfflineJudge, bundle_theme_logratio_fn, make_judge, unavailable
from .presets import ASSETS, SITES
from .probe import features_for_text
from .settings import ALPHA, APP_PROMPTS, STRENGTH, T_MODULE, T_RES, SteerSettings
from .steer import plan_run, schedule_table

log = logging.getLogger(__name__)
VARIANT_TITLES = {"unsteered": "Unsteered", "steered": "Steered", "single": "Steered: single layer",
                  "cumulative": "Steered: cumulative flow", "prompted": "Control: asking the model",
                  "random": "Control: random directions"}


def variant_title(variant: str, task: str = "activate") -> str:
    """A column's title: removal's random control scales random SAE features, not random directions."""
    if variant == "random" and task == "remove":
        return "Control: random features"
    return VARIANT_TITLES.get(variant, variant)


# Neuronpedia source ids of the SAE families the presets use (feature pages: /model/source/index).
NEURONPEDIA_SOURCES = {"gemma-2-2b": "{layer}-gemmascope-{site}-16k", "llama3.1-8b": "{layer}-llamascope-{site}-32k"}
NEURONPEDIA_SITE = {"res": "res", "mlp": "mlp", "attn": "att"}
DEMO_FILE = ASSETS / "demo_examples.json"
MAX_SEED_SET_CHARS = 400  # the feature box: an id or a seed set of ids separated by commas


# ---- curated demo examples ----------------------------------------------------------------------

@dataclass(frozen=True)
class DemoExample:
    """One curated one-click example (assets/demo_examples.json, schema in
    assets/demo_examples.schema.json).

    Fields:
        title: button text, e.g. "Weddings".
        feature: seed feature id ``layer/site/index`` of the preset, or a seed set of ids joined
            by ", " (steered together, each at its own layer).
        theme: what the judge looks for, in plain words.
        explanation: one or two plain-language sentences shown with the example.
        preset: the preset the ids belong to (examples of other presets are not shown).
        task, condition, strength, alpha, layer, samples, max_new_tokens, seed, prompt: steering
            settings (defaults: the paper's cumulative exponential schedule).
    """

    title: str
    feature: str
    theme: str
    explanation: str = ""
    preset: str = "default"
    task: str = "activate"
    condition: str = "cumulative"
    strength: float = STRENGTH
    alpha: float = ALPHA
    layer: int | None = None
    r: float = 0.0
    samples: int = 2
    max_new_tokens: int = 32
    seed: int = 0
    prompt: str = ""

    def __post_init__(self) -> None:
        if not self.title.strip() or not self.theme.strip():
            raise ValueError("every example needs a non-empty title and theme")
        try:
            self.settings()
        except ValueError as e:
            raise ValueError(f"example {self.title!r}: {e}") from None

    @property
    def prompt_or_default(self) -> str:
        return self.prompt or APP_PROMPTS[self.task]

    def settings(self) -> SteerSettings:
        """The example's run (controls on: the demo always shows both)."""
        return SteerSettings.create(self.feature, task=self.task, condition=self.condition, layer=self.layer,
                                    strength=self.strength, alpha=self.alpha, r=self.r, samples=self.samples,
                                    max_new_tokens=self.max_new_tokens, seed=self.seed, prompt=self.prompt_or_default,
                                    theme=self.theme, controls=("prompt", "random"))


def load_demo_examples(bundle: Bundle | None = None, path: Path = DEMO_FILE) -> list[DemoExample]:
    """Examples for ``bundle``'s preset (all of them without a bundle); [] when the file is absent.

    The file is ``{"examples": [{...}, ...]}``; unknown keys and ids that do not exist in the
    bundle are errors (the file is curated by hand, so it must fail loudly)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with an 'examples' list")
    known = set(DemoExample.__dataclass_fields__)
    out = []
    for i, row in enumerate(rows):
        extra = set(row) - known
        if extra:
            raise ValueError(f"{path}: example {i} has unknown keys {sorted(extra)}; valid: {sorted(known)}")
        ex = DemoExample(**row)
        if bundle is not None and ex.preset == bundle.preset.name:
            for f in ex.feature.split(","):  # an id, or a seed set of ids
                parse_feature(f.strip(), bundle)
            out.append(ex)
        elif bundle is None:
            out.append(ex)
    return out


def load_demo_evidence(path: Path = DEMO_FILE) -> dict[str, dict]:
    """The demo sweep's record of every theme that has a fresh-seed check, by title: the file the
    examples file names under ``evidence`` (``results/<preset>/demo/sweep.json``, relative to the
    repository root, i.e. the examples file's grandparent folder); {} when either is absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    rel = data.get("evidence") if isinstance(data, dict) else None
    src = path.resolve().parent.parent / rel if rel else None
    if src is None or not src.is_file():
        if rel:
            log.warning("demo evidence %s named by %s is missing", rel, path)
        return {}
    sweep = json.loads(src.read_text())
    return {t["title"]: {**t, "rules": sweep.get("rules", {}), "source": rel}
            for t in sweep.get("themes", []) if t.get("confirm")}


def evidence_markdown(rec: dict | None, shown: int = 2) -> str:
    """Every fresh-seed sample a curated example was checked on (`load_demo_evidence` record), each
    marked by the sweep's rule (✓ counted, ✗ not), steered texts verbatim, with the steered and
    unsteered counts: a run in the Demo tab shows only the first ``shown`` of them, which can be
    the misses (walkthrough, session 16: Religion's seeds 16-17 are two of its two misses)."""
    if not rec:
        return "_No recorded fresh-seed samples for this example._"
    conf, rules = rec["confirm"], rec.get("rules", {})
    steered, unsteered = conf["steered"]["samples"], conf["unsteered"]["samples"]
    n, seeds = len(steered), [x["seed"] for x in steered]
    what = "no theme word" if rec.get("task") == "remove" else "a word of the theme"
    rule = (f"{what}, perplexity <= {rules.get('max_perplexity', 100):g} under the unsteered model"
            + (f", distinct-2 >= {rules['min_distinct_2']:g}" if "min_distinct_2" in rules else ""))
    lines = [f"**All {n} fresh samples this setting was checked on** (seeds {min(seeds)}-{max(seeds)}, "
             f"recorded by the demo sweep in `{rec.get('source', 'sweep.json')}`; ✓ = counted by the rule: {rule}): "
             f"steered **{sum(x['hit'] for x in steered)} of {n}**, unsteered {sum(x['hit'] for x in unsteered)} "
             f"of {n}. Running the example shows the first {shown} seeds live.", ""]
    for x in steered:
        why = "" if x["hit"] else (" _(unreadable by the rule)_" if not x.get("readable", True) else "")
        lines.append(f"- {'✓' if x['hit'] else '✗'} **seed {x['seed']}**: {_verbatim(x['text']) or '(empty)'}{why}")
    return "\n".join(lines)


# ---- provenance ------------------------------------------------------------------------------------

def model_hash(bundle: Bundle) -> str:
    """sha256 of the model weights file(s) where they are local; the hub revision otherwise."""
    p = bundle.preset
    if p.gguf_package:
        return "gguf-sha256:" + file_sha256(package_dir(p.gguf_package, p.gguf_requirement) / p.model)
    folder = Path(p.model)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(file_sha256(f).encode())
        return "safetensors-sha256:" + h.hexdigest()
    rev = getattr(bundle.model.config, "_commit_hash", None)
    return f"hub:{p.model}@{rev or 'unknown revision'}"


def sae_hash(folder: Path | None) -> str:
    if folder is None:
        return "hub (not hashed)"
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode() + file_sha256(f).encode())
    return h.hexdigest()


def library_versions() -> dict:
    import gradio
    import sae_lens
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "sae_lens": sae_lens.__version__, "gradio": gradio.__version__}


# ---- the playground -------------------------------------------------------------------------------

def _escape(text: str) -> str:
    """Token text safe inside Markdown + inline HTML (newlines shown as a symbol)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", "⏎")
    for ch in "\\`*_[]#|~":
        text = text.replace(ch, "\\" + ch)
    return text


def _verbatim(text: str) -> str:
    """Generated text shown as written inside Markdown, never as Markdown: every character that
    could format is escaped, newlines shown as ⏎, and a start that reads as a list item ("- ",
    "+ ", "010. ", "1) ") or a heading is escaped too."""
    text = _escape(text.strip()).replace("⏎", " ⏎ ")
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", re.sub(r"^([-+])", r"\\\1", text))


def card_theme(card) -> str:
    """A judge theme from a feature card: an LLM label as written, else the words of its readable
    label (`catalog.labels.judge_theme`); "" when that label names only small words or pieces (the
    person types the theme: a raw label such as 'a, in, the → tuning' is no theme)."""
    if card.label_source == "llm":
        return card.label[:100]
    return judge_theme(list(zip(card.top_tokens, card.top_token_shares)), card.context_words)


MATCH_FIELDS = {"label": "in its label", "top": "fires on", "tag": "its tag", "context": "in its texts",
                "promoted": "pushes toward"}


def plain_matches(matched) -> str:
    """Why a search hit matched (`catalog.search.Match` list), in plain words: Match("music",
    "top", "musical") -> "music: fires on “musical”" (the walkthrough read the compact form
    "top ≈musical" and "promoted" as jargon). Reasons of one query word are joined, words by "; "."""
    if any(m.field == "id" for m in matched):
        return "feature id"
    def plain(m) -> str:
        name = MATCH_FIELDS.get(m.field, m.field)
        return f"{name} “{m.related}”" if m.related else (f"{name} it" if m.field in ("top", "promoted") else name)

    return "; ".join(f"{w}: {', '.join(dict.fromkeys(plain(m) for m in ms))}"
                     for w, ms in matches_by_word(matched).items())


def _no_theme_note(lens: list[str]) -> str:
    """The card's note for a feature whose label names no theme (`card_theme` gave ""); ``lens``:
    the words its direction pushes the model toward (`Catalog.lens_words`), which explain why
    such a feature can still steer toward a theme."""
    why = ("Its strongest tokens are small words, punctuation or word pieces, so its label cannot name a theme from "
           "them (the top contexts below show where they occur)"
           + (f"; what its direction writes can: it pushes the model toward {', '.join(lens)}, "
              "and steering adds that direction" if lens else ""))
    return (f"_{why}. Check “Theme for the judge” (it keeps your search words or the example's theme) "
            "or type what the judge should look for._")


@dataclass
class Playground:
    """Everything the app reads for every session; built once by `create`, never mutated later.

    Fields:
        bundle: model + SAEs.
        catalog: feature catalog (None when the preset has none: pick features by id).
        judge: the server's judge (OpenAI when OPENAI_API_KEY is set at start-up, else offline).
        hashes: model and SAE file hashes for run records (computed at start-up).
        versions: library versions for run records.
        examples: curated demo examples of this preset.
        batcher: merges concurrent users' generation requests into one batched call
            (`steering.batching`); None generates each request alone.
        evidence: the demo sweep's record per example title (`load_demo_evidence`), shown in the
            Demo tab as every fresh sample the example was checked on.
    """

    bundle: Bundle
    catalog: Catalog | None = None
    judge: Judge = field(default_factory=OfflineJudge)
    hashes: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    examples: list[DemoExample] = field(default_factory=list)
    batcher: GenerationBatcher | None = None
    evidence: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def create(cls, bundle: Bundle, judge=None) -> "Playground":
        try:
            catalog = Catalog.load(bundle)
        except FileNotFoundError as e:
            log.warning("no feature catalog: %s", e)
            catalog = None
        hashes = {"model": model_hash(bundle),
                  "saes": {f"{l}/{s}": sae_hash(bundle.sae_folders.get((l, s))) for l, s in sorted(bundle.saes)}}
        demo = Path(os.environ.get("FFP_DEMO_FILE", DEMO_FILE))
        judge = judge or make_judge(theme_logratio_fn=bundle_theme_logratio_fn(bundle))
        return cls(bundle, catalog, judge, hashes, library_versions(), load_demo_examples(bundle, demo),
                   GenerationBatcher(bundle) if limits.MODEL_CONCURRENCY > 1 else None, load_demo_evidence(demo))

    # ---- picking a feature ---------------------------------------------------------------------
    def search(self, query: str, k: int = 20, researcher: bool = False) -> list[list]:
        """Rows [feature, label, score, matched words] of the catalog search (res features), best
        first; labels in whole words unless ``researcher`` (the catalog's raw labels)."""
        if self.catalog is None:
            raise ValueError("this preset has no feature catalog: pick a feature by id (layer/site/index)")
        hits = self.catalog.search(query, k)
        if not hits:
            raise ValueError(f"no good match for {query.strip()[:80]!r}: no feature of this model matches it; try a "
                             "related everyday word, or type a sentence in 'Which features fire?'")
        return [[h.feature, self.label(h.feature, researcher), round(h.score, 2), plain_matches(h.matched)]
                for h in hits]

    @staticmethod
    def search_note(query: str, scores: list[float]) -> str:
        """A plain sentence above the results when the best one matches only weakly ("" otherwise)."""
        if not scores or max(scores) >= GOOD_SCORE:
            return ""
        return (f"**No good match for “{_escape(query.strip()[:80])}”** among this model's features. The closest "
                "weak matches are listed (through a related word, or a word the feature rarely fires on). Try an "
                "everyday word for the same idea, or type a sentence in *Which features fire?*")

    def text_features(self, text: str, k: int = 10, show_all: bool = False,
                      researcher: bool = False) -> tuple[list[tuple[str, str | None]], list[list]]:
        """Tokens tagged with their strongest feature, and rows [feature, label, max activation in units
        of the feature's typical activation, token]. Attention sinks and features that fire on form
        (punctuation, function words, dense features: `Catalog.function_features`) are left out
        unless ``show_all``.
        A character split over several tokens is shown once, whole (`catalog.words.token_pieces`)."""
        hide = self.catalog.function_features if self.catalog is not None and not show_all else None
        out = features_for_text(self.bundle, text, k, hide=hide, keep_sinks=show_all)
        spans, where = [], {}
        for piece, positions in out["pieces"]:
            best = max((f for p in positions for f in out["per_token"][p][:1]), key=lambda fa: fa[1], default=None)
            spans.append((piece, best[0] if best else None))
            where.update({p: piece for p in positions})
        rows = [[fid, self.label(fid, researcher), round(act, 3), f"{where.get(t, out['tokens'][t])!r} (#{t})"]
                for fid, act, t in out["top"]]
        return spans, rows

    def label(self, fid: str, researcher: bool = False) -> str:
        """The catalog's label: in whole words for a lay reader, raw (word pieces, logit lens) for a researcher."""
        if self.catalog is None:
            return ""
        return self.catalog.label(fid) if researcher else self.catalog.plain_label(fid)

    def relabel(self, rows: list[list], researcher: bool = False) -> list[list]:
        """The same table rows (feature id first, label second) with labels for the chosen view."""
        return [[r[0], self.label(r[0], researcher), *r[2:]] for r in rows if r and r[0]]

    def default_theme(self, fid: str) -> str:
        """Judge theme derived from the catalog (`card_theme`: an LLM label, else the words of the
        readable label; "" when it names none), editable in the UI."""
        if self.catalog is None:
            return ""
        try:
            return card_theme(self.catalog.card(fid))
        except ValueError:
            return ""

    def seed_set(self, feature: str) -> list[FeatureId]:
        """The feature id(s) typed in the feature box: one id, or a seed set separated by commas."""
        text = limits.clean_text("feature id", feature, MAX_SEED_SET_CHARS)
        ids = [parse_feature(x.strip(), self.bundle) for x in text.split(",") if x.strip()]
        if not ids:
            raise ValueError("feature: give a feature id layer/site/index, or several separated by commas")
        return list(dict.fromkeys(ids))

    def card_markdown(self, fid: str, researcher: bool = False) -> tuple[str, str]:
        """Markdown card of a feature (of the first of a seed set, named above it) and a default
        theme for the judge. Its label in whole words; the raw label and the logit-lens tokens in the
        ``researcher`` view only."""
        seeds = self.seed_set(fid)
        f = seeds[0]
        lines, theme = [f"### Feature `{f}`"], ""
        if len(seeds) > 1:
            lines.insert(0, f"**Seed set of {len(seeds)} features**: {', '.join(f'`{x}`' for x in seeds)}; their "
                            "flow graphs are merged for steering (the card shows the first).\n")
        scale = float(self.bundle.ref_scale(f.layer, f.site)[f.index])
        if self.catalog is not None:
            c = self.catalog.card(f)  # built once per keystroke: the theme comes from the same card
            theme, lens = card_theme(c), self.catalog.lens_words(f)
            raw = f" · raw: <code>{_escape(c.label)}</code>" if researcher and c.label_source != "llm" else ""
            lines += [f"**{self.label(str(f), researcher)}** <small>({c.label_source} label{raw})</small>", "",
                      *([] if theme else [_no_theme_note(lens), ""]),
                      f"max activation **{c.max_act:.2f}** · fires on **{100 * c.frequency:.3f}%** of tokens · "
                      f"mean when active **{c.mean_act:.2f}**", "",
                      f"Fires most on: {', '.join(repr(t) for t in c.top_tokens[:6])}  "]
            if researcher:
                lines.append(f"Promotes (logit lens): {', '.join(repr(t) for t in c.promoted_tokens[:6])}")
            elif lens:
                lines.append(f"Pushes the model toward: {', '.join(lens)}")
            lines += ["", "**Top contexts** (the token where it fires is highlighted):"]
            for ctx in c.contexts:
                toks = [_escape(t) for t in ctx["tokens"]]
                i = ctx["index"]
                toks[i] = f"<mark><b>{toks[i]}</b></mark>"
                dom = f" <i>{_escape(ctx['domain'])}</i>" if ctx.get("domain") else ""
                lines.append(f"- <code>{ctx['act']:.2f}</code>{dom} " + "".join(toks))
        lines.append(f"\nSteering unit: strength 1 adds {scale:.3g} x the feature's unit direction "
                     f"({self.bundle.units(f.layer, f.site)} units: about one typical activation).")
        url = neuronpedia_url(self.bundle.preset.neuronpedia, f)
        if url:
            lines.append(f"\n[Open {f} on Neuronpedia]({url})")
        return "\n".join(lines), theme

    # ---- flow --------------------------------------------------------------------------------------
    def flow(self, fid, t_res: float = T_RES, t_module: float = T_MODULE) -> FlowGraph:
        if not isinstance(fid, FeatureId):  # typed text (a run's settings hold a parsed id)
            fid = limits.clean_text("feature id", fid, 100)
        for name, t in (("t(R) threshold", t_res), ("module threshold", t_module)):
            limits.check_number(name, t, 1.0)
        labels = self.catalog.labels() if self.catalog else None
        return build_flow_graph(self.bundle, fid, float(t_res), float(t_module), "both", labels)

    def flows(self, feature: str, t_res: float = T_RES, t_module: float = T_MODULE) -> list[FlowGraph]:
        """The flow graph of each feature of a seed set (one id: a list of one graph)."""
        return [self.flow(f, t_res, t_module) for f in self.seed_set(feature)]

    def live(self, graph: FlowGraph, prompt: str) -> dict:
        return live_activations(self.bundle, graph, prompt)

    def node_label(self, researcher: bool = False):
        """The function that names a flow-graph node in the chosen view (`label`), or None without a
        catalog (the graph's own labels are then all there is)."""
        if self.catalog is None:
            return None
        return lambda fid: self.label(fid, researcher)

    def node_rows(self, graph: FlowGraph, researcher: bool = False) -> list[list]:
        """The graph's nodes as table rows, by layer and site; labels in the chosen view."""
        def r(v):
            return None if v is None else round(v, 3)
        name = self.node_label(researcher) or (lambda fid: "")
        nodes = sorted(graph.nodes, key=lambda n: (n.layer, SITES.index(n.site)))
        return [[str(n.id), n.layer, n.site, n.role, r(n.score), r(n.s_res), r(n.s_mlp), r(n.s_attn),
                 "yes" if n.in_span else "cut", name(str(n.id)) or n.label] for n in nodes]

    # ---- steering ------------------------------------------------------------------------------------
    def settings(self, feature, **form) -> SteerSettings:
        """A run's settings from the form or API fields, validated once (`SteerSettings.create`);
        ``feature`` may be a seed set (ids separated by commas)."""
        return SteerSettings.create(feature, n_layers=self.bundle.n_layers, **form)

    def plan(self, settings: SteerSettings, condition: str | None = None) -> list:
        """Steering specs of the run's condition (or ``condition``): the union of the plans of its
        seed features' flow graphs, a node shared by two graphs steered once (`steer.plan_run`)."""
        s = settings if condition is None else dataclasses.replace(settings, condition=condition)
        return plan_run(self.bundle, s, self.flow)[1]

    @staticmethod
    def carried_markdown(title: str, s: SteerSettings) -> str:
        """What "Open it in the Playground" put into the form, said once above it."""
        push = (f"strength s = {s.strength:g}, schedule {s.schedule}, alpha = {s.alpha:g}" if s.task == "activate"
                else f"rescale r = {s.r:g}")
        parts = [f"feature `{s.feature}`", f"task {s.task}", f"condition {s.condition}",
                 f"layer {'of the seed' if s.layer is None else s.layer}", push, f"prompt «{_escape(s.prompt)}»",
                 f"judge theme “{_escape(s.theme)}”", f"{s.samples} samples from seed {s.seed}",
                 f"{s.max_new_tokens} new tokens", f"t(R) = {s.t_res:g}, t(M/A) = {s.t_module:g}",
                 "controls: " + (", ".join(s.controls) or "none"), f"token scope {s.scope}",
                 f"chat template {'on' if s.chat else 'off'}", "no excluded or extra nodes"]
        return (f"**Settings carried from the demo example “{_escape(title)}”** (they stay until you change them): "
                + "; ".join(parts) + ".")

    @staticmethod
    def prompt_line(prompt: str, chat: bool = False) -> str:
        """The line above the output columns: the prompt every column continues."""
        how = " (through the chat template)" if chat else ""
        return f"**Prompt**, the same for every column{how}: «{_escape(prompt or '')}»"

    def schedule_rows(self, specs: list) -> list[dict]:
        return schedule_table(specs, self.bundle)

    def steer(self, variants: dict[str, list], settings: SteerSettings, api_key: str = "", on_tokens=None) -> dict:
        """Generate every variant for the run's seeds in one batch, then score all texts (left
        unscored when the theme is empty). The run's controls (``prompt``, ``random``:
        `steering.controls`) add the control variants ``prompted`` / ``random`` for the variant
        named ``steered``; the prompting control needs a theme and is skipped without one.

        ``api_key`` (optional, per request) selects an OpenAI judge for this request only; it is
        never stored, logged or returned. ``on_tokens(names, rows)`` streams every decoding step
        (`generate.RowStreamer`; `partial_markdown` renders it)."""
        s = settings
        controls = tuple(c for c in s.controls if c != "prompt" or s.theme)
        gens = generate_with_controls(self.bundle, s.prompt, variants, s.seeds, controls, s.theme, s.task,
                                      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                      chat=s.chat, check_cost=True,
                                      on_tokens=on_tokens, scope=s.scope,
                                      **({"generate": self.batcher.generate_variants} if self.batcher else {}))
        variants = {name: None for name in dict.fromkeys(g.variant for g in gens)}
        judge = make_judge(api_key=api_key.strip()) if api_key and api_key.strip() else self.judge
        texts = [g.text for g in gens]
        if not s.theme:  # nothing to judge against: show the texts unscored
            scores = [unavailable(judge.name, s.task, "", "no theme given") for _ in texts]
        else:  # the offline judge's coherence also uses perplexity under the unsteered model
            scores = judge.score(texts, s.theme, s.task, [g.metrics.get("perplexity") for g in gens])
        return {"generations": gens, "scores": scores, "variants": list(variants), "seeds": s.seeds,
                "judge": judge.name, "theme": s.theme, "task": s.task, "prompt": s.prompt,
                "max_new_tokens": s.max_new_tokens}

    @staticmethod
    def summary(result: dict) -> dict[str, dict]:
        """Mean scaled scores per variant (scored texts only)."""
        out = {}
        for name in result["variants"]:
            sc = [s for g, s in zip(result["generations"], result["scores"]) if g.variant == name and s.available]
            if sc:
                out[name] = {"behavioral": sum(s.behavioral_scaled for s in sc) / len(sc),
                             "coherence": sum(s.coherence_scaled for s in sc) / len(sc),
                             "metric": sum(s.metric for s in sc) / len(sc)}
        return out

    def partial_markdown(self, live: dict, variant: str, max_new_tokens: int | None = None,
                         task: str = "activate") -> str:
        """A column while it is being generated: each seed's text so far (``live`` maps
        (variant, seed) to the new token ids so far, as `generate.RowStreamer` sends them). Its
        status line says "waiting…" before its first token (the prompting control is a second
        batch), "writing…" while it is written and "written; scores follow…" once every row has
        ended (EOS or ``max_new_tokens``: the judge runs once the last column is written)."""
        tok = self.bundle.tokenizer
        rows = sorted(((seed, ids) for (name, seed), ids in live.items() if name == variant), key=lambda r: r[0])
        done = bool(rows) and max_new_tokens is not None and all(
            tok.eos_token_id in ids or len(ids) >= max_new_tokens for _, ids in rows)
        status = "written; scores follow…" if done else "writing…" if rows else "waiting for its turn…"
        lines = [f"### {variant_title(variant, task)}", f"<small>{status}</small>\n"]
        for seed, ids in rows:
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            text = _verbatim(tok.decode(ids, skip_special_tokens=True)) or "…"
            lines.append(f"**seed {seed}**\n\n> {text}\n")
        return "\n".join(lines)

    @staticmethod
    def column_markdown(result: dict, variant: str, focus: str | None = None) -> str:
        """One side-by-side column: each sample's text, scores and local metrics, with how strongly
        the ``focus`` feature (e.g. the seed) fires when the unsteered model reads the generated
        tokens: its mean activation and on how many tokens it fires (0 of n: on none of them, e.g.
        never among a TopK SAE's top k; a real reading, not a failed one)."""
        lines = [f"### {variant_title(variant, result.get('task', 'activate'))}"]
        if variant == "prompted":  # the others continue the prompt shown above the columns (prompt_line)
            theme = result.get("theme", "")
            ask = f"«{_escape(instruction(theme, result.get('task', 'activate')))}»" if theme.strip() else "the request"
            lines.append(f"<small>prompt: {ask}, then «{_escape(result.get('prompt', ''))}»</small>\n")
        mean = Playground.summary(result).get(variant)
        if mean:  # the same /5 scale as each sample's line; the metric is 0-1
            lines.append(f"mean theme **{mean['behavioral'] * 5:.1f}/5** · readability "
                         f"**{mean['coherence'] * 5:.1f}/5** · metric **{mean['metric']:.2f}**\n")
        plain = {g.seed: g.token_ids for g in result["generations"] if g.variant == "unsteered"}
        for g, s in zip(result["generations"], result["scores"]):
            if g.variant != variant:
                continue
            text = _verbatim(g.text) or "(empty)"
            lines.append(f"**seed {g.seed}**\n\n> {text}\n")
            if variant not in ("unsteered", "prompted") and list(plain.get(g.seed, ())) == list(g.token_ids):
                # same prompt, same seed, same tokens: the change never reached the sampled tokens
                lines.append("_Word for word the unsteered text of this seed: "
                             + ("the scaled features did not fire on these tokens, so nothing changed._"
                                if result.get("task") == "remove" else "the push did not change a sampled token._"))
            if s.available:
                tag = "offline fallback judge" if s.offline else s.judge
                theme = f"theme {s.behavioral:.1f}/5"
                if s.behavioral_range:  # the offline judge's calibrated range (steering/judging/calibration.py)
                    lo, hi = s.behavioral_range
                    theme = (f"theme **uncertain** ({lo:.1f}-{hi:.1f}/5)" if s.uncertain
                             else f"theme {s.behavioral:.1f}/5 (range {lo:.1f}-{hi:.1f})")
                lines.append(f"{theme} · readability {s.coherence:.1f}/5 · metric {s.metric:.2f} _({tag})_")
            else:
                lines.append(f"_score {s.error}_")
            m = g.metrics
            fa, on = m.get("feature_activation", {}), m.get("feature_active_tokens", {})
            n_tok = m.get("n_tokens", len(g.token_ids))
            acts = ""
            if focus in fa:
                fires = (f"fires on {on[focus]} of {n_tok} tokens" + (" (none: this text does not evoke it)"
                                                                     if on[focus] == 0 else "")
                         if focus in on else "")
                acts = (f" · {focus} when the unsteered model reads this text: mean activation {fa[focus]:.2f}"
                        + (f", {fires}" if fires else ""))
            ppl = m.get("perplexity")
            lines.append(f"<small>perplexity {ppl if ppl is not None else 'n/a'} · distinct-2 "
                         f"{m.get('distinct_2', 'n/a')} · {n_tok} tokens{acts}</small>\n")
        return "\n".join(lines)

    def run_record(self, settings: SteerSettings, schedules: dict[str, list], result: dict) -> dict:
        """Everything needed to reproduce a run (no API key: it is never part of the settings)."""
        used = sorted({r["feature"].rsplit("/", 1)[0] for rows in schedules.values() for r in rows})
        return {
            "preset": self.bundle.preset.name, "model": self.bundle.preset.model,
            "model_hash": self.hashes.get("model"),
            "sae_hashes": {k: self.hashes.get("saes", {}).get(k) for k in used},
            "device": str(self.bundle.device), "dtype": str(self.bundle.dtype), "versions": self.versions,
            "feature": settings.feature, "settings": settings.to_json(), "schedules": schedules,
            "seeds": result["seeds"], "prompt": result["prompt"], "theme": result["theme"], "judge": result["judge"],
            "generations": [g.to_json() for g in result["generations"]],
            "scores": [s.to_json() for s in result["scores"]],
            "reproduce": reproduce_command(self.bundle.preset.root or self.bundle.preset.name, settings),
        }


def reproduce_command(preset: str, settings: SteerSettings) -> str:
    """The CLI call that regenerates the texts of a run (same seeds, thresholds and controls)."""
    s = settings
    args = ["python", "-m", "steering", "steer", s.feature, "--preset", preset, "--condition", s.condition]
    for key in ("task", "strength", "schedule", "alpha", "s_end", "r", "seed", "samples", "max_new_tokens",
                "t_res", "t_module"):
        args += ["--" + key.replace("_", "-"), str(getattr(s, key))]
    if s.layer is not None:
        args += ["--layer", str(s.layer)]
    if s.controls:
        args += ["--controls", ",".join(s.controls)]
    if s.theme:
        args += ["--theme", s.theme]
    if s.scope != "all":
        args += ["--scope", s.scope]
    args += ["--prompt", s.prompt] + (["--chat"] if s.chat else [])
    cmd = " ".join(shlex.quote(a) for a in args)
    if s.exclude or s.include:
        cmd += "  # the CLI has no include/exclude; this run changed the node set"
    return cmd


def neuronpedia_url(model_id: str, f) -> str:
    """Feature page on Neuronpedia for presets with public SAEs there ("" otherwise)."""
    template = NEURONPEDIA_SOURCES.get(model_id)
    if not template:
        return ""
    source = template.format(layer=f.layer, site=NEURONPEDIA_SITE[f.site])
    return f"https://www.neuronpedia.org/{model_id}/{source}/{f.index}"
