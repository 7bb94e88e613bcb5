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

from tqdm import tqdm

log = logging.getLogger("steering")


def load_bundle(args):
    from .bundle import Bundle

    return Bundle.load(args.preset, device=args.device,
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
    common.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="preset, model and SAE sizes").set_defaults(fn=cmd_info)
    for register in _REGISTER:
        register(sub, common)
    return p


def _register_flow(sub, common):
    from .flow import register
    register(sub, common)


def cmd_steer(args) -> dict:
    import math

    from . import limits
    from .features import parse_feature
    from .flow import build_flow_graph
    from .generate import TASK_DEFAULTS, generate_variants
    from .steer import CONDITIONS, SCHEDULES, plan, schedule_table

    parse_feature(args.feature)
    if args.mode not in CONDITIONS:
        raise ValueError(f"unknown --mode {args.mode!r}; valid: {', '.join(CONDITIONS)}")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {args.schedule!r}; valid: {', '.join(SCHEDULES)}")
    for name in ("strength", "alpha", "s_end", "r"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
    limits.check_int("--samples", args.samples, 1, limits.MAX_SAMPLES)
    defaults = TASK_DEFAULTS[args.task]
    max_new = args.max_new_tokens or defaults["max_new_tokens"]
    limits.check_int("--max-new-tokens", max_new, 1, limits.MAX_NEW_TOKENS)
    prompt = defaults["prompt"] if args.prompt is None else args.prompt
    limits.clean_text("--prompt", prompt, limits.MAX_PROMPT_CHARS)
    bundle = load_bundle(args)
    graph = build_flow_graph(bundle, args.feature)
    strength = args.r if args.task == "remove" else args.strength
    specs = plan(graph, args.mode, args.layer, strength, args.schedule, args.alpha, args.s_end,
                 mode="rescale" if args.task == "remove" else "add")
    seeds = [args.seed + i for i in range(args.samples)]
    gens = generate_variants(bundle, prompt, {"baseline": [], "steered": specs}, seeds, max_new,
                             temperature=args.temperature, chat=args.chat)
    base = [g for g in gens if g.variant == "baseline"]
    steered = [g for g in gens if g.variant == "steered"]
    one = args.samples == 1
    return {"prompt": prompt, "feature": args.feature, "task": args.task, "mode": args.mode,
            "baseline": base[0].text if one else [g.text for g in base],
            "steered": steered[0].text if one else [g.text for g in steered],
            "schedule": schedule_table(specs), "seeds": seeds,
            "metrics": {"baseline": [g.metrics for g in base], "steered": [g.metrics for g in steered]},
            "flow": {"l_start": graph.l_start, "l_end": graph.l_end}}


def _register_steer(sub, common):
    p = sub.add_parser("steer", parents=[common], help="generate unsteered vs steered text")
    p.add_argument("feature", help="seed feature id layer/site/index")
    p.add_argument("--task", default="activate", choices=["activate", "remove"])
    p.add_argument("--mode", default="cumulative", help="baseline | single | cumulative")
    p.add_argument("--layer", type=int, default=None, help="layer l (default: the seed's layer)")
    p.add_argument("--strength", type=float, default=3.0, help="s, in multiples of the feature's typical activation")
    p.add_argument("--alpha", type=float, default=-0.25, help="exponential decay (exp schedule)")
    p.add_argument("--s-end", type=float, default=1.0, help="end value s* (linear schedule)")
    p.add_argument("--schedule", default="exp", help="exp | linear | constant")
    p.add_argument("--r", type=float, default=0.0, help="rescale factor for --task remove")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--temperature", type=float, default=1.27)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(fn=cmd_steer)


# Subcommands defined beside the code they drive register themselves here.
_REGISTER: list = [_register_flow, _register_steer]


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
