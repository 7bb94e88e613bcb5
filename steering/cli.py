"""Command line: ``python -m steering {info,flow,steer} ...``.

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

log = logging.getLogger("steering")


def load_bundle(args):
    from .bundle import Bundle, parse_max_memory

    dm = getattr(args, "device_map", None) or None
    return Bundle.load(args.preset, device=args.device, device_map=dm,
                       max_memory=parse_max_memory(getattr(args, "max_memory", None)),
                       progress=lambda it: tqdm(it, desc="loading SAEs", file=sys.stderr))


def cmd_info(args) -> dict:
    return load_bundle(args).info()


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
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
    for register in _REGISTER:
        register(sub, common)
    _add_catalog(sub.add_parser("catalog", help="feature catalog: build, search, show, refresh"), common)
    _add_judge(sub.add_parser("judge", help="offline judge: calibrate"))
    return p


def _register_flow(sub, common):
    from .flow import register
    register(sub, common)


def _register_steer(sub, common):
    from .generate import register
    register(sub, common)


def _register_export(sub, common):
    from .export import register
    register(sub, common)


# Subcommands defined beside the code they drive register themselves here.
_REGISTER: list = [_register_flow, _register_steer, _register_export]


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

    result = calibrate(perplexity_preset=args.perplexity_preset)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return {"out": str(args.out), "evaluation": result["evaluation"]}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0
