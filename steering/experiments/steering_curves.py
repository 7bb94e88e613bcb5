"""``python -m steering.experiments steering``: theme activation and theme removal with flow graphs
(paper §4.2, §5.3, App. B, C.3, Figs. 10-11).

- Activation (App. B.2): prompt "I think ", 36 new tokens, top_p 0.7, T 1.27. Conditions:
  baseline (the seed feature alone), single (flow-graph features at layer l), cumulative
  (features at l_start..l, MLP/attention nodes included) with constant, exponential
  (s e^(alpha l), alpha = -0.05) and linear (s at l_start to s* = 1 at l) schedules; s swept, l
  swept over the graph's layers. Metric: behavioral x coherence.
- Removal (App. B.1): the physics prompt, 96 new tokens, rescaling r in {0, -1, ..., -64} on
  every token; baseline (seed only) / single / cumulative. Metric: (1 - behavioral) x coherence.
- Controls (issue 18): the model asked for the theme ("prompted", through the same prompt plus a
  plain request) and random directions of the same norms on the same layers with the same
  schedule ("random", for the main cumulative condition at every strength and layer); every
  configuration's metric carries a seed-level 95% interval.
- Scores from `steering.judging.make_judge` (gpt-4o-mini with OPENAI_API_KEY, else the labelled
  offline judge).

One resumable unit per (task, theme, condition, strength): every layer x sample of that
condition, generated in batches of at most MAX_ROWS rows (seeded per row, so batching does not
change a row) and judged; the unit file keeps the texts.
"""

from __future__ import annotations

import logging
import re
import statistics
from typing import NamedTuple

from ..generate import generate_variants
from ..settings import ACTIVATION_PROMPT, DEPRECATED_CONDITIONS, REMOVAL_PROMPT, TEMPERATURE, TOP_P
from ..limits import MAX_ROWS
from ..steer import plan
from . import common
from .fanout import Job, run_jobs

log = logging.getLogger(__name__)
ACT_CONDITIONS = ("baseline", "single", "constant", "exp", "linear")
REM_CONDITIONS = ("baseline", "single", "cumulative")
R_VALUES = "0,-1,-2,-4,-8,-16,-32,-64"  # paper App. B.1


class Theme(NamedTuple):
    """A steering theme: the paper's name, the catalog query used to find a feature, and the
    theme text given to the judge."""

    paper: str
    query: str
    judge: str


ACTIVATION_THEMES = (  # paper App. B.2 (Gemma 2 2B 12/res/4111, 16226, 4230, 5483)
    Theme("anger and frustration", "offended angry", "strong emotions: being angry, offended, upset or afraid"),
    Theme("mental health issues", "health illness", "health, illness and medicine"),
    Theme("wedding and marriage", "wedding marriage", "weddings and marriage"),
    Theme("religion and God", "religion church God", "religion, church and God"),
)
REMOVAL_THEME = Theme("Scientific concepts and entities", "physics science", "physics and scientific concepts")
# Features picked by hand from the catalog search of the default preset's aligned SAEs (the
# catalog's top hit for the theme query at a middle layer, as the paper steers layer 12 of 26;
# docs/results.md lists the hits). The catalog has no mental-health feature: the nearest it
# supports. Anger: since session 12 the catalog has "angry" features (until then 13/res/92, then
# labelled "of, herself, self", stood in); 8/res/505 and 9/res/505 rank above 17/res/234 for the
# query but lead with "sad".
PRESET_FEATURES = {"default": {
    "anger and frustration": ("17/res/234", "'angry, worried, upset' (catalog hit for 'offended angry' whose "
                                            "label leads with angry; the two above it lead with 'sad')"),
    "mental health issues": ("6/res/978", "nearest: 'health' with 'mental' in its contexts (no mental-health "
                                          "feature in the catalog)"),
    "wedding and marriage": ("8/res/893", "'wedding' (catalog hit for 'wedding marriage' at a middle layer)"),
    "religion and God": ("9/res/824", "'religious, religion, God' (the index 824 recurs at layers 8-17)"),
    "Scientific concepts and entities": ("2/res/634", "'science, physics, engineer' (catalog hit for "
                                         "'physics science')"),
}}
# Controls (issue 18): the model asked for the theme (prompted: one unit per theme, like unsteered)
# and, for the main cumulative condition, the same plans with random directions of the same norms
# (random: every direction rotated by one seeded rotation; removal: random features of the same
# sites), at every strength and layer.
CONTROL_OF = {"activate": "exp", "remove": "cumulative"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def resolve_theme(bundle, theme: Theme, given: str | None, catalog) -> dict:
    """The seed feature of a theme: ``--theme``/``--removal-theme`` FEATURE=JUDGE THEME, else the
    preset's hand-picked feature, else the catalog's top search hit. Records how it was chosen."""
    from ..features import parse_feature

    hits = []
    if catalog is not None:
        hits = [{"feature": h.feature, "label": h.label, "score": h.score} for h in catalog.search(theme.query, k=5)]
    if given:
        fid, _, judge = given.partition("=")
        feature, how, judge = fid.strip(), "given on the command line", judge.strip() or theme.judge
    elif theme.paper in PRESET_FEATURES.get(bundle.preset.name, {}):
        feature, how = PRESET_FEATURES[bundle.preset.name][theme.paper]
        judge = theme.judge
    elif hits:
        feature, how, judge = hits[0]["feature"], f"top catalog hit for {theme.query!r}", theme.judge
    else:
        raise ValueError(f"no feature for theme {theme.paper!r}: this preset has no feature catalog; pass "
                         "--theme FEATURE=THEME (activation) or --removal-theme FEATURE=THEME")
    fid = parse_feature(feature, bundle)
    if fid.site != "res":
        raise ValueError(f"theme seed {fid} must be a residual feature (layer/res/index)")
    label = catalog.label(fid) if catalog is not None else ""
    return {"paper_theme": theme.paper, "feature": str(fid), "label": label, "judge_theme": judge,
            "chosen": how, "catalog_query": theme.query, "catalog_hits": hits}


def sweep_layers(graph, stride: int, given: list[int] | None) -> list[int]:
    """Layers l to steer at: ``given`` (those inside the graph's span), else every ``stride``-th
    layer of the span plus the seed's layer."""
    span = range(graph.l_start, graph.l_end + 1)
    if given:
        layers = [l for l in given if l in span]
        if not layers:
            raise ValueError(f"--layers {given} are all outside the flow graph span {graph.l_start}..{graph.l_end} "
                             f"of {graph.seed}")
        return sorted(set(layers))
    return sorted({*span[::stride], graph.seed.layer})


def specs_for(graph, condition: str, layer: int, strength: float, task: str, alpha: float, s_end: float):
    # results keep the condition names they were recorded with ("baseline"); the library gets the
    # current name (seed-only), so a run logs no deprecation warning
    condition = DEPRECATED_CONDITIONS.get(condition, condition)
    if task == "remove":
        return plan(graph, condition, layer, strength, mode="rescale")
    if condition in ("seed-only", "single"):
        return plan(graph, condition, layer, strength, "constant")
    return plan(graph, "cumulative", layer, strength, condition, alpha, s_end)


def run_unit(bundle, judge, graph, theme: dict, task: str, condition: str, strength: float | None,
             layers: list[int], seeds: list[int], max_new_tokens: int, alpha: float, s_end: float) -> dict:
    """Generate and judge every layer x seed of one condition; returns rows with texts and scores."""
    from ..controls import instruction, random_control

    prompt = ACTIVATION_PROMPT if task == "activate" else REMOVAL_PROMPT
    ask = None
    if condition in ("unsteered", "prompted"):
        variants = {"none": []}
        ask = instruction(theme["judge_theme"], task) if condition == "prompted" else None
    elif condition == "random":
        main = CONTROL_OF[task]
        variants = {l: random_control(bundle, specs_for(graph, main, l, strength, task, alpha, s_end))
                    for l in layers}
    elif condition == "baseline":
        variants = {graph.seed.layer: specs_for(graph, "baseline", graph.seed.layer, strength, task, alpha, s_end)}
    else:
        variants = {l: specs_for(graph, condition, l, strength, task, alpha, s_end) for l in layers}
    n_features = {str(k): len(v) for k, v in variants.items()}
    names = list(variants)
    per_call = max(1, MAX_ROWS // len(seeds))
    gens, keys = [], []
    for i in range(0, len(names), per_call):
        chunk = {str(n): variants[n] for n in names[i:i + per_call]}
        gens += generate_variants(bundle, prompt, chunk, seeds, max_new_tokens, instruction=ask)
        keys += [n for n in names[i:i + per_call] for _ in seeds]
    # every judge takes the perplexities (the offline judge's coherence uses them)
    perplexities = [g.metrics.get("perplexity") for g in gens]
    scores = judge.score([g.text for g in gens], theme["judge_theme"], task, perplexities=perplexities)
    seed_f = theme["feature"]
    rows = []
    for key, g, s in zip(keys, gens, scores):
        rows.append({"layer": None if key == "none" else key, "seed": g.seed, "text": g.text,
                     "behavioral": s.behavioral_scaled, "coherence": s.coherence_scaled, "metric": s.metric,
                     "perplexity": g.metrics.get("perplexity"), "distinct_2": g.metrics.get("distinct_2"),
                     "seed_activation": g.metrics.get("feature_activation", {}).get(seed_f)})
    return {"rows": rows, "n_features": n_features, "judge": getattr(judge, "name", str(judge))}


_JUDGES: dict = {}


def judge_for(kind: str):
    """One judge per process and kind (``auto``: `make_judge`, ``offline``); a Ray worker builds its own."""
    if kind not in _JUDGES:
        from ..judging import OfflineJudge, make_judge

        _JUDGES[kind] = make_judge() if kind == "auto" else OfflineJudge()
    return _JUDGES[kind]


def curve_unit(bundle, judge_kind: str, judge_name: str, feature: str, t_res: float, **unit) -> dict:
    """One unit as a module-level function of the bundle (a `fanout.Job`, so it can run on a Ray
    worker): the flow graph of ``feature`` at ``t_res`` and `run_unit` with this process's judge.

    Raises:
        RuntimeError: this process's judge is not ``judge_name`` (e.g. a worker without the
            driver's OPENAI_API_KEY): units of two judges are never mixed.
    """
    from ..flow import build_flow_graph

    judge = judge_for(judge_kind)
    if judge.name != judge_name:
        raise RuntimeError(f"this worker's judge is {judge.name!r}, the run's is {judge_name!r}")
    return run_unit(bundle, judge, build_flow_graph(bundle, feature, t_res=t_res), **unit)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def reference(results: dict[tuple, dict], cond: str) -> dict[str, dict]:
    """Per theme: mean scores (and the seed-level interval of the metric) of a theme-level unit
    (``unsteered`` or ``prompted``)."""
    return {t: {**{k: _mean(r[k] for r in v["rows"]) for k in ("behavioral", "coherence", "metric")},
                "metric_ci95": ci95([r["metric"] for r in v["rows"]])}
            for (t, c, _), v in results.items() if c == cond}


def ci95(xs: list) -> list[float] | None:
    """Seed-level 95% interval of a mean (normal approximation, mean +- 1.96 sd / sqrt(n)); None
    below 2 scored samples."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m, half = statistics.fmean(xs), 1.96 * statistics.stdev(xs) / len(xs) ** 0.5
    return [round(m - half, 4), round(m + half, 4)]


def config_points(results: dict[tuple, dict]) -> list[dict]:
    """Mean behavioral / coherence / metric per (theme, condition, strength, layer) over samples."""
    out = []
    for (theme, cond, strength), res in results.items():
        by_layer: dict = {}
        for r in res["rows"]:
            by_layer.setdefault(r["layer"], []).append(r)
        for layer, rows in by_layer.items():
            out.append({"theme": theme, "condition": cond, "strength": strength, "layer": layer, "n": len(rows),
                        "behavioral": _mean(r["behavioral"] for r in rows),
                        "coherence": _mean(r["coherence"] for r in rows),
                        "metric": _mean(r["metric"] for r in rows),
                        "metric_ci95": ci95([r["metric"] for r in rows]),
                        "config": f"{theme} · {cond} · strength {strength} · layer {layer}"})
    return out


def best_per_condition(points: list[dict]) -> dict[str, dict[str, dict]]:
    """Per theme and condition, the configuration with the highest mean metric."""
    out: dict[str, dict[str, dict]] = {}
    for p in points:
        if p["metric"] is None:
            continue
        cur = out.setdefault(p["theme"], {}).get(p["condition"])
        if cur is None or p["metric"] > cur["metric"]:
            out[p["theme"]][p["condition"]] = {k: p[k] for k in ("metric", "behavioral", "coherence", "strength",
                                                                 "layer", "config", "n")}
    return out


def condition_table(points: list[dict], best: dict) -> dict[str, dict]:
    """Per condition: mean over themes of the best metric, and the mean behavioral / coherence /
    metric over all its configurations (how sensitive it is to s and l)."""
    out = {}
    for cond in dict.fromkeys(p["condition"] for p in points):
        pts = [p for p in points if p["condition"] == cond]
        out[cond] = {"best_metric_mean_over_themes": _mean(b[cond]["metric"] for b in best.values() if cond in b),
                     "best_behavioral": _mean(b[cond]["behavioral"] for b in best.values() if cond in b),
                     "best_coherence": _mean(b[cond]["coherence"] for b in best.values() if cond in b),
                     "all_configs_metric": _mean(p["metric"] for p in pts),
                     "all_configs_behavioral": _mean(p["behavioral"] for p in pts),
                     "all_configs_coherence": _mean(p["coherence"] for p in pts), "n_configs": len(pts)}
    return out


def check(args) -> dict:
    """Validate the options before any model is loaded."""
    from .. import limits

    limits.check_int("--n-themes", args.n_themes, 1, len(ACTIVATION_THEMES))
    for name in ("samples", "removal_samples", "layer_stride", "max_new_tokens", "removal_tokens"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("samples", "removal_samples"):
        limits.check_int("--" + name.replace("_", "-"), getattr(args, name), 1, MAX_ROWS)
    for name in ("max_new_tokens", "removal_tokens"):
        limits.check_int("--" + name.replace("_", "-"), getattr(args, name), 1, limits.MAX_NEW_TOKENS)
    strengths = common.parse_floats(args.strengths, "--strengths")
    for s in strengths:
        limits.check_number("--strengths", s, limits.MAX_ABS_STRENGTH)
    rs = common.parse_floats(args.r, "--r")
    for r in rs:
        limits.check_number("--r", r, limits.MAX_ABS_R)
    limits.check_number("--alpha", args.alpha, limits.MAX_ABS_ALPHA)
    if not -1.0 <= args.t_res <= 1.0:
        raise ValueError(f"--t-res must be a cosine threshold in [-1, 1], got {args.t_res}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in ("activate", "remove") for t in tasks):
        raise ValueError(f"unknown --tasks {args.tasks!r}; valid: activate, remove (comma-separated)")
    for given in (args.theme or []) + ([args.removal_theme] if args.removal_theme else []):
        if "=" not in given:
            raise ValueError(f"--theme / --removal-theme must be FEATURE=THEME, e.g. '8/res/697=weddings', "
                             f"got {given!r}")
    layers = common.parse_ints(args.layers, "--layers") if args.layers else None
    return {"strengths": strengths, "r": rs, "tasks": tasks, "layers": layers}


def run(args, bundle) -> dict:
    from ..catalog import Catalog
    from ..flow import build_flow_graph
    from . import figures

    opts = check(args)
    try:
        catalog = Catalog.load(bundle)
    except FileNotFoundError as e:
        log.info("no catalog: %s", e)
        catalog = None
    labels = catalog.labels() if catalog is not None else {}
    judge = judge_for(args.judge)
    folder = common.out_dir(args.out, bundle, "steering")
    units = common.Units(folder / "units", args.command_line, common.sae_fingerprint(bundle))
    show = not args.quiet
    summary = {"command": args.command_line, "preset": bundle.preset.name, "model": bundle.preset.model,
               "judge": {"name": judge.name, "label": getattr(judge, "label", "")},
               "settings": {"t_res": args.t_res, "t_module": 0.15, "layer_stride": args.layer_stride,
                            "layers": opts["layers"], "strengths": opts["strengths"], "alpha": args.alpha,
                            "s_end": args.s_end, "r": opts["r"], "samples": args.samples,
                            "removal_samples": args.removal_samples, "seed": args.seed, "top_p": TOP_P,
                            "temperature": TEMPERATURE, "activation_prompt": ACTIVATION_PROMPT,
                            "activation_tokens": args.max_new_tokens, "removal_prompt": REMOVAL_PROMPT,
                            "removal_tokens": args.removal_tokens, "units": "folded (s x the feature's mean "
                            "non-zero activation x unit direction)", "tasks": opts["tasks"]},
               "figures": []}
    given = iter(args.theme or [])
    jobs = []
    if "activate" in opts["tasks"]:
        themes = [resolve_theme(bundle, t, next(given, None), catalog) for t in ACTIVATION_THEMES[:args.n_themes]]
        seeds = [args.seed + i for i in range(args.samples)]
        jobs.append(("activate", themes, ACT_CONDITIONS, opts["strengths"], seeds, args.max_new_tokens))
    if "remove" in opts["tasks"]:
        theme = resolve_theme(bundle, REMOVAL_THEME, args.removal_theme, catalog)
        seeds = [args.seed + i for i in range(args.removal_samples)]
        jobs.append(("remove", [theme], REM_CONDITIONS, opts["r"], seeds, args.removal_tokens))
    for task, themes, conditions, strengths, seeds, n_tok in jobs:
        graphs = {}
        plan_units = []
        for th in themes:
            g = build_flow_graph(bundle, th["feature"], t_res=args.t_res, catalog_labels=labels)
            layers = sweep_layers(g, args.layer_stride, opts["layers"])
            graphs[th["paper_theme"]] = {**th, "l_start": g.l_start, "l_end": g.l_end, "layers": layers,
                                         "n_nodes_in_span": sum(n.in_span for n in g.nodes)}
            plan_units += [(th, g, layers, "unsteered", None), (th, g, layers, "prompted", None)]
            plan_units += [(th, g, layers, c, s) for s in strengths for c in (*conditions, "random")]
        units_of = []
        for th, g, layers, cond, s in plan_units:
            letter = "r" if task == "remove" else "s"
            name = f"{task}/{slug(th['paper_theme'])}/{cond}" + ("" if s is None else f"/{letter}={s:g}")
            settings = {"preset": bundle.preset.name, "task": task, "feature": th["feature"],
                        "judge": judge.name, "judge_theme": th["judge_theme"], "condition": cond, "strength": s,
                        "layers": [g.seed.layer] if cond in ("baseline", "unsteered", "prompted") else layers,
                        "control_of": CONTROL_OF[task] if cond == "random" else None,
                        "seeds": seeds, "max_new_tokens": n_tok, "t_res": args.t_res,
                        "alpha": args.alpha if cond == "exp" else None,
                        "s_end": args.s_end if cond == "linear" else None}
            kwargs = {"judge_kind": args.judge, "judge_name": judge.name, "feature": th["feature"],
                      "t_res": args.t_res, "theme": th, "task": task, "condition": cond, "strength": s,
                      "layers": layers, "seeds": seeds, "max_new_tokens": n_tok, "alpha": args.alpha,
                      "s_end": args.s_end}
            units_of.append(((th["paper_theme"], cond, s), Job(name.replace("/", "__"), settings, curve_unit, kwargs)))
        done = run_jobs(units, [j for _, j in units_of], bundle, args.workers, args.preset, args.device,
                        args.ray_address, progress=common.progress(f"steering {task}", disable=not show))
        results = {key: done[j.name] for key, j in units_of}
        points = config_points({k: v for k, v in results.items() if k[1] not in ("unsteered", "prompted")})

        unsteered, prompted = reference(results, "unsteered"), reference(results, "prompted")
        best = best_per_condition(points)
        for t, u in unsteered.items():
            best.setdefault(t, {})["unsteered"] = {**u, "config": "no steering", "strength": None, "layer": None}
        for t, u in prompted.items():
            best.setdefault(t, {})["prompted"] = {**u, "config": "asking the model", "strength": None, "layer": None}
        x = "strength"
        summary[task] = {"themes": graphs, "unsteered": unsteered, "prompted": prompted, "best": best,
                         "conditions": condition_table(points, best), "points": points}
        summary["figures"] += common.save_figure(
            figures.curve_figure(_best_over(points, "strength"), "layer", "theme",
                                 f"{task}: metric vs layer (best {x} per layer)"), folder / f"{task}_vs_layer.html")
        summary["figures"] += common.save_figure(
            figures.curve_figure(_best_over(points, "layer"), "strength", "theme",
                                 f"{task}: metric vs {'r' if task == 'remove' else 's'} (best layer)"),
            folder / f"{task}_vs_strength.html")
        if task == "remove":
            summary["figures"] += common.save_figure(
                figures.curve_figure(_mean_over(points, "layer"), "strength", "theme",
                                     "remove: metric vs r (mean over layers: sensitivity to l)"),
                folder / "remove_vs_r_mean_layers.html")
        summary["figures"] += common.save_figure(figures.best_bars(best, f"{task}: best configuration per condition"),
                                                 folder / f"{task}_best.html")
        summary["figures"] += common.save_figure(figures.pareto_figure(points, f"{task}: behavioral vs coherence"),
                                                 folder / f"{task}_pareto.html")
    summary["units"] = units.report()
    summary["headline"] = {task: {"conditions": summary[task]["conditions"], "unsteered": summary[task]["unsteered"],
                                  "prompted": summary[task]["prompted"],
                                  "themes": {t: {k: v[k] for k in ("feature", "label", "l_start", "l_end", "layers")}
                                             for t, v in summary[task]["themes"].items()}}
                           for task in opts["tasks"]}
    summary["wall_seconds"] = common.elapsed(args)
    common.write_json(folder / "summary.json", summary)
    return summary


def _best_over(points: list[dict], over: str) -> list[dict]:
    """Collapse ``over`` (strength or layer) by keeping the best metric of each remaining config."""
    best: dict = {}
    for p in points:
        key = tuple(v for k, v in p.items() if k in ("theme", "condition", "strength", "layer") and k != over)
        if p["metric"] is not None and (key not in best or p["metric"] > best[key]["metric"]):
            best[key] = p
    return list(best.values())


def _mean_over(points: list[dict], over: str) -> list[dict]:
    groups: dict = {}
    for p in points:
        key = tuple(v for k, v in p.items() if k in ("theme", "condition", "strength", "layer") and k != over)
        groups.setdefault(key, []).append(p)
    return [{**ps[0], "metric": _mean(p["metric"] for p in ps)} for ps in groups.values()]


def register(sub, parent) -> None:
    p = sub.add_parser("steering", parents=[parent], help="theme activation / removal curves (paper §5.3)")
    p.add_argument("--tasks", default="activate,remove", help="activate, remove or both (default: %(default)s)")
    p.add_argument("--theme", action="append", help="FEATURE=JUDGE THEME for the activation themes, in the "
                   "order anger, mental health, wedding, religion (default: the preset's picks or catalog hits)")
    p.add_argument("--n-themes", type=int, default=4, help="how many activation themes (default: 4)")
    p.add_argument("--removal-theme", default=None, help="FEATURE=JUDGE THEME for removal")
    p.add_argument("--strengths", default="1,2,4,8,16", help="activation s values (folded units)")
    p.add_argument("--r", default=R_VALUES, help="removal r values, written --r=0,-1 (default: paper App. B.1)")
    p.add_argument("--alpha", type=float, default=-0.05, help="exponential schedule alpha (App. B.2)")
    p.add_argument("--s-end", type=float, default=1.0, help="linear schedule s* (App. B.2)")
    p.add_argument("--t-res", type=float, default=0.5,
                   help="flow-graph cut threshold t(R) (paper: 0.5)")
    p.add_argument("--layers", default="", help="layers l to sweep (default: every --layer-stride-th of the span)")
    p.add_argument("--layer-stride", type=int, default=6, help="layer sweep step (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, help="samples per activation configuration")
    p.add_argument("--removal-samples", type=int, default=4, help="samples per removal configuration")
    p.add_argument("--max-new-tokens", type=int, default=36, help="activation tokens (paper: 36)")
    p.add_argument("--removal-tokens", type=int, default=96, help="removal tokens (paper: 96)")
    p.add_argument("--judge", default="auto", choices=["auto", "offline"],
                   help="auto: gpt-4o-mini with OPENAI_API_KEY, else offline; offline: always the local judge")
    p.set_defaults(run=run, check=check, smoke_values={"strengths": "4", "r": "0,-4", "samples": 1,
                                                       "removal_samples": 1, "max_new_tokens": 6,
                                                       "removal_tokens": 6, "n_themes": 2})
