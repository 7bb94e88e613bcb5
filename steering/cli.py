"""Command line: every ``python -m steering`` subcommand (info, flow, steer, export, catalog, judge, bench).

Every subcommand is defined here; the library modules have no argument parsers and never print.

Every subcommand takes ``--preset`` (a name or a preset.json path; default from
``FFP_PRESET`` or ``default``) and ``--json``. Errors exit with status 2 and one clear line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from . import limits
from .settings import (ALPHA, S_END, SCOPES, STRENGTH, T_MODULE, T_RES, TASK_DEFAULTS, TEMPERATURE, TOP_P,
                       SteerSettings)

log = logging.getLogger("steering")
# Output keys renamed in this release; the old ones are still written, with the same values, until the next.
DEPRECATED_KEYS = {"baseline": "unsteered", "mode": "condition"}


def load_bundle(args):
    from .bundle import Bundle, parse_max_memory

    dm = getattr(args, "device_map", None) or None
    return Bundle.load(args.preset, device=args.device, device_map=dm,
                       max_memory=parse_max_memory(getattr(args, "max_memory", None)),
                       progress=lambda it: tqdm(it, desc="loading SAEs", file=sys.stderr))


def cmd_info(args) -> dict:
    return load_bundle(args).info()


def _print(result: dict, as_json: bool, text=None) -> None:
    """JSON, or ``text(result)`` where the command has a readable form, else one line per key."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    if text is not None:
        print(text(result))
        return
    for key, value in result.items():
        print(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m steering", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default=os.environ.get("FFP_PRESET", "default"),
                        help="preset name or path to a preset.json (default: %(default)s)")
    common.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    common.add_argument("--device-map", default=os.environ.get("FFP_DEVICE_MAP"),
                        help="accelerate device_map for big presets, e.g. auto (splits layers over GPUs, "
                        "then CPU, then disk); env FFP_DEVICE_MAP")
    common.add_argument("--max-memory", default=os.environ.get("FFP_MAX_MEMORY"),
                        help="with --device-map: per-device budget, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    common.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="preset, model and SAE sizes").set_defaults(fn=cmd_info)
    _add_flow(sub.add_parser("flow", parents=[common], help="flow graph of a feature (layer/site/index)"))
    _add_steer(sub.add_parser("steer", parents=[common], help="generate unsteered vs steered text (paper §5.3)"))
    _add_export(sub.add_parser("export", parents=[common], help="write a steering plan as a llama.cpp control "
                               "vector (GGUF, the repeng format)"))
    _add_catalog(sub.add_parser("catalog", help="feature catalog: build, search, show, refresh"), common)
    _add_judge(sub.add_parser("judge", help="offline judge: calibrate"))
    _add_bench(sub.add_parser("bench", parents=[common], help="performance benchmark (ratios measured in one run)"))
    return p


# ---- flow ---------------------------------------------------------------------------------------

def _add_flow(p: argparse.ArgumentParser) -> None:
    from .flow import DIRECTIONS, GRAPH_METHODS

    p.add_argument("feature", help="feature id layer/site/index, e.g. 12/res/40")
    p.add_argument("--t-res", type=float, default=T_RES, help="cut where s(R) < this (default %(default)s, App. B.2)")
    p.add_argument("--t-module", type=float, default=T_MODULE,
                   help="keep MLP/attn nodes with score >= this (default %(default)s)")
    p.add_argument("--direction", default="both", choices=DIRECTIONS)
    p.add_argument("--method", default="top1_cosine", help=f"matching method: {', '.join(GRAPH_METHODS[:3])}")
    p.set_defaults(fn=cmd_flow)


def catalog_labels(bundle) -> dict[str, str]:
    """The catalog's labels for flow-graph nodes ({} without a usable catalog, logged)."""
    from .catalog import Catalog

    try:
        return Catalog.load(bundle).labels()
    except FileNotFoundError as e:
        log.info("no catalog labels: %s", e)
    except ValueError as e:  # a stale catalog must not hide the graph; say why labels are missing
        log.warning("catalog labels not used: %s", e)
    return {}


def cmd_flow(args) -> dict:
    from .features import parse_feature
    from .flow import GRAPH_METHODS, build_flow_graph

    feature = parse_feature(args.feature)  # fail on malformed ids before loading a model
    if args.method not in GRAPH_METHODS or args.method == "top1_pearson":
        raise ValueError(f"unknown --method {args.method!r}; valid: {', '.join(GRAPH_METHODS[:3])} "
                         "(top1_pearson is data-based: use steering.flow.pearson_tables from Python)")
    bundle = load_bundle(args)
    graph = build_flow_graph(bundle, feature, args.t_res, args.t_module, args.direction, catalog_labels(bundle),
                             args.method)
    return graph.to_json()


# ---- steer and export ---------------------------------------------------------------------------

def _add_plan_args(p: argparse.ArgumentParser) -> None:
    """The plan options (feature, condition, strength, schedule, flow thresholds) of ``steer`` and
    ``export``; defaults from `steering.settings`."""
    p.add_argument("feature", help="seed feature id layer/site/index, e.g. 12/res/4111, or a seed set "
                   "separated by commas (their flow graphs are merged, as in the paper's removal)")
    p.add_argument("--task", default="activate", choices=list(TASK_DEFAULTS),
                   help="activate: add the features; remove: rescale them by --r (default: %(default)s)")
    p.add_argument("--condition", default=None,
                   help="seed-only | single | cumulative (default: cumulative)")
    p.add_argument("--mode", default=None, help="deprecated name of --condition (removed in the next release)")
    p.add_argument("--layer", type=int, default=None, help="layer l (default: the seed's layer)")
    p.add_argument("--strength", type=float, default=STRENGTH,
                   help=f"s, in multiples of the feature's typical activation (|s| <= {limits.MAX_ABS_STRENGTH:g})")
    p.add_argument("--schedule", default="exp", help="exp | linear | constant (cumulative only; default: %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="exp schedule: s'(l) = s * e^(alpha * l)")
    p.add_argument("--s-end", type=float, default=S_END, help="linear schedule: s* at the graph's last layer l_end")
    p.add_argument("--r", type=float, default=0.0, help=f"--task remove: rescale factor (|r| <= {limits.MAX_ABS_R:g})")
    p.add_argument("--t-res", type=float, default=T_RES,
                   help="flow graph: residual threshold t(R) (default: %(default)s)")
    p.add_argument("--t-module", type=float, default=T_MODULE,
                   help="flow graph: MLP/attention threshold (default: %(default)s)")


def _add_steer(p: argparse.ArgumentParser) -> None:
    _add_plan_args(p)
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    p.add_argument("--samples", type=int, default=1, help=f"samples per variant (<= {limits.MAX_SAMPLES})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: 36 (activate) or 96 (remove); <= {limits.MAX_NEW_TOKENS}")
    p.add_argument("--prompt", default=None, help="default: the task's prompt from the paper")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="(default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--theme", default="", help="judge every variant for this theme (OpenAI judge when "
                   "OPENAI_API_KEY is set, with OPENAI_BASE_URL for any compatible server; else the offline "
                   "fallback, labelled)")
    p.add_argument("--controls", default="", help="comma list of controls: prompt (ask the model for the "
                   "theme; needs --theme), random (norm-matched random directions)")
    p.add_argument("--scope", default="all", choices=list(SCOPES),
                   help="which tokens are steered: all (the paper's setting), the prompt's, or the generated "
                   "ones (attention sinks never; default: %(default)s)")
    p.set_defaults(fn=cmd_steer)


def _add_export(p: argparse.ArgumentParser) -> None:
    _add_plan_args(p)
    p.add_argument("--out", type=Path, required=True, help="output .gguf file")
    p.set_defaults(fn=cmd_export)


def steer_settings(args) -> SteerSettings:
    """The run's settings from parsed ``steer`` / ``export`` arguments, validated once (no model
    needed); errors name the flags."""
    condition, name = args.condition, "--condition"
    if args.mode is not None:
        log.warning("--mode is deprecated: it is the condition; use --condition (--mode goes in the next release)")
        if condition is None:
            condition, name = args.mode, "--mode"
    names = {k: "--" + k.replace("_", "-") for k in ("task", "layer", "strength", "schedule", "alpha", "s_end", "r",
                                                       "t_res", "t_module", "seed", "samples", "max_new_tokens",
                                                       "prompt", "temperature", "top_p", "theme", "scope")}
    names["condition"] = name
    extra = {k: getattr(args, k) for k in ("seed", "samples", "max_new_tokens", "prompt", "temperature", "top_p",
                                           "chat", "theme", "controls", "scope") if hasattr(args, k)}
    return SteerSettings.create(args.feature, names=names, task=args.task, condition=condition, layer=args.layer,
                                strength=args.strength, schedule=args.schedule, alpha=args.alpha, s_end=args.s_end,
                                r=args.r, t_res=args.t_res, t_module=args.t_module, **extra)


def cmd_steer(args) -> dict:
    from .controls import generate_with_controls
    from .steer import plan_run, schedule_table

    s = steer_settings(args)
    if "prompt" in s.controls and not s.theme:
        raise ValueError("--controls prompt needs --theme (what the prompting control asks for)")
    bundle = load_bundle(args)
    graphs, specs = plan_run(bundle, s)
    gens = generate_with_controls(bundle, s.prompt, {"unsteered": [], "steered": specs}, s.seeds, s.controls,
                                  s.theme, s.task, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                  top_p=s.top_p, chat=s.chat, check_cost=True, scope=s.scope)
    by = {name: [g for g in gens if g.variant == name] for name in dict.fromkeys(g.variant for g in gens)}
    one = s.samples == 1

    def texts(name):
        return by[name][0].text if one else [g.text for g in by[name]]

    out = {"prompt": s.prompt, "feature": s.feature, "task": s.task, "condition": s.condition, "scope": s.scope,
           "unsteered": texts("unsteered"), "steered": texts("steered"),
           "schedule": schedule_table(specs, bundle), "seeds": s.seeds,
           "metrics": {name: [g.metrics for g in gs] for name, gs in by.items()},
           "flow": {"l_start": graphs[0].l_start, "l_end": graphs[0].l_end, "t_res": s.t_res,
                    "t_module": s.t_module,
                    "graphs": [{"seed": str(g.seed), "l_start": g.l_start, "l_end": g.l_end} for g in graphs]}}
    if s.controls:
        out["controls"] = {name: texts(name) for name in ("prompted", "random") if name in by}  # like unsteered
    if s.theme:
        from .judging import bundle_theme_logratio_fn, make_judge

        judge = make_judge(theme_logratio_fn=bundle_theme_logratio_fn(bundle))
        out["theme"], out["judge"] = s.theme, judge.name
        out["scores"] = {name: [x.to_json() for x in judge.score([g.text for g in gs], s.theme, s.task,
                                                                  [g.metrics.get("perplexity") for g in gs])]
                         for name, gs in by.items()}
    return with_deprecated_keys(out)


def with_deprecated_keys(out: dict) -> dict:
    """``out`` plus the output keys of the last release (`DEPRECATED_KEYS`: ``baseline`` for
    ``unsteered``, also inside ``metrics`` and ``scores``; ``mode`` for ``condition``)."""
    for old, new in DEPRECATED_KEYS.items():
        if new in out:
            out[old] = out[new]
        for group in ("metrics", "scores"):
            if new in out.get(group, {}):
                out[group][old] = out[group][new]
    out["deprecated_keys"] = {old: f"renamed {new}; the old key goes in the next release"
                              for old, new in DEPRECATED_KEYS.items() if old in out}
    return out


def cmd_export(args) -> dict:
    from .export import layer_vectors, write_control_vector
    from .steer import plan_run

    if args.task != "activate":
        raise ValueError("export: theme removal (--task remove) is not a constant vector; use --task activate")
    s = steer_settings(args)
    bundle = load_bundle(args)
    _, specs = plan_run(bundle, s)
    vectors, approx, skipped = layer_vectors(bundle, specs)
    hint = bundle.preset.model if bundle.preset.gguf_package else bundle.preset.arch
    path = write_control_vector(args.out, vectors, hint)
    return with_deprecated_keys({
        "out": str(path), "feature": s.feature, "condition": s.condition, "layers": sorted(vectors),
        "norms": {str(n): round(float(vectors[n].norm()), 4) for n in sorted(vectors)},
        "approximate": approx, "skipped": skipped, "model_hint": hint,
        "usage": f"llama-cli -m MODEL.gguf --control-vector {path}"})


# ---- catalog ------------------------------------------------------------------------------------

def _llm_client(mode: str):
    if mode == "off" or (mode == "auto" and not os.environ.get("OPENAI_API_KEY")):
        return None
    if not os.environ.get("OPENAI_API_KEY"):
        raise ValueError("--llm on needs OPENAI_API_KEY in the environment")
    import openai

    return openai.OpenAI(timeout=60, max_retries=3)


def _add_catalog(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """``catalog {build,search,show,refresh}``."""
    from .catalog.build import CTX

    sub = p.add_subparsers(dest="catalog_command", required=True)
    b = sub.add_parser("build", parents=[common], help="build the catalog of a preset")
    b.add_argument("--out", type=Path, default=None, help="folder (default: the preset's assets/catalog)")
    b.add_argument("--tokens", type=int, default=150_000, help="token budget (default: %(default)s)")
    b.add_argument("--ctx", type=int, default=CTX)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sites", default=None, help="comma-separated sites (default: all)")
    b.add_argument("--llm", choices=["auto", "on", "off"], default="auto",
                   help="LLM labels (auto: when OPENAI_API_KEY is set)")
    b.add_argument("--llm-sites", default="res", help="sites that get LLM labels (default: %(default)s)")
    s = sub.add_parser("search", parents=[common], help="search features by keyword")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=20)
    s.add_argument("--sites", default="res")
    s.add_argument("--out", type=Path, default=None, help="catalog folder")
    r = sub.add_parser("refresh", parents=[common], help="recompute offline labels and related words of a built "
                       "catalog (no model needed)")
    r.add_argument("--out", type=Path, default=None, help="catalog folder")
    c = sub.add_parser("show", parents=[common], help="print a feature's card")
    c.add_argument("feature")
    c.add_argument("--out", type=Path, default=None, help="catalog folder")
    p.set_defaults(fn=cmd_catalog)


def cmd_catalog(args) -> dict:
    """Run a parsed ``catalog`` command; returns a JSON-able result."""
    from .catalog import Catalog, build_catalog
    from .presets import get_preset

    root = args.out or get_preset(args.preset).assets_root / "catalog"
    if args.catalog_command == "search":
        hits = Catalog.load(root).search(args.query, args.k, tuple(args.sites.split(",")))
        return {"query": args.query, "hits": [h.to_json() for h in hits]}
    if args.catalog_command == "show":
        return Catalog.load(root).card(args.feature).to_json()
    if args.catalog_command == "refresh":
        cat = Catalog.load(root)
        cat.derive()
        sizes = cat.save(root)
        return {"out": str(root), "total_bytes": sum(sizes.values()), "related_words": cat.meta["related_words"]}
    client = _llm_client(args.llm)
    bundle = load_bundle(args)
    sites = tuple(args.sites.split(",")) if args.sites else None
    cat = build_catalog(bundle, args.tokens, args.ctx, args.batch, args.seed, sites, llm_client=client,
                        llm_sites=tuple(args.llm_sites.split(",")), progress=True)
    sizes = cat.save(root)
    return {"out": str(root), "total_bytes": sum(sizes.values()), "largest_file": max(sizes.values()),
            **{k: cat.meta[k] for k in ("tokens", "tokens_per_domain", "label_source", "build_seconds")}}


# ---- judge --------------------------------------------------------------------------------------

def _add_judge(p: argparse.ArgumentParser) -> None:
    """``judge calibrate``: refit the offline judge on assets/judge/labelled.jsonl."""
    from .judging.base import JUDGE_DIR

    sub = p.add_subparsers(dest="judge_command", required=True)
    c = sub.add_parser("calibrate", help="refit the offline judge's calibration (assets/judge/calibration.json)")
    c.add_argument("--perplexity-preset", default="",
                   help="coherence uses perplexity under this preset's model, as in the app (e.g. 'default'); "
                        "the model is loaded once, without SAEs")
    c.add_argument("--out", type=Path, default=JUDGE_DIR / "calibration.json")
    p.set_defaults(fn=cmd_judge)


def cmd_judge(args) -> dict:
    from .judging.calibration import calibrate

    result = calibrate(perplexity_preset=args.perplexity_preset, previous=args.out)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return {"out": str(args.out), "evaluation": result["evaluation"]}


# ---- bench --------------------------------------------------------------------------------------

def _add_bench(p: argparse.ArgumentParser) -> None:
    """``bench``: steering overhead, side-by-side cost, flow latency, cold start (`steering.bench`)."""
    p.add_argument("--feature", default=None, help="seed feature for steering timings")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--skip-cold-start", action="store_true")
    g = p.add_argument_group("Gemma scale (random weights; meant for a GPU)")
    g.add_argument("--gemma-scale", action="store_true", help="benchmark a random Gemma-2-2B-sized bundle")
    g.add_argument("--layers", type=int, default=26)
    g.add_argument("--d-model", type=int, default=2304)
    g.add_argument("--width", type=int, default=16384)
    g.add_argument("--vocab", type=int, default=256000)
    g.add_argument("--compile", action="store_true", help="also time a static KV cache + torch.compile")
    g.add_argument("--hbm-gbps", type=float, default=3350.0, help="memory bandwidth (H100 SXM: 3350 GB/s)")
    p.set_defaults(fn=cmd_bench, text=_bench_table)


def cmd_bench(args) -> dict:
    from . import bench

    return bench.run(args)


def _bench_table(result: dict) -> str:
    from .bench import targets_table

    return targets_table(result)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    _print(result, getattr(args, "json", False), getattr(args, "text", None))
    return 0
