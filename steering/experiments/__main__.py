"""The paper's analyses (§5.1-5.3) on any preset: predecessor groups, deactivation, steering curves.

``python -m steering.experiments {groups,deactivation,steering}`` (paper §5.1-5.3). Results go to
``results/<preset>/<command>/`` (JSON + HTML figures); finished units are cached there and reused
on a rerun with the same settings. Errors exit with status 2 and one clear line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from tqdm import tqdm

from . import common

def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from . import deactivation, groups, steering_curves

    p = argparse.ArgumentParser(prog=common.PROG, description=__doc__.split("\n")[0])
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--preset", default=os.environ.get("FFP_PRESET", "default"),
                        help="preset name or path to a preset.json (default: %(default)s)")
    parent.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    parent.add_argument("--out", default=None, help="results root (default: results/<preset name>)")
    parent.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parent.add_argument("--smoke", action="store_true",
                        help="tiny counts for CI (options given explicitly still win)")
    parent.add_argument("--quiet", action="store_true", help="no progress bars")
    parent.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parent.add_argument("--workers", type=int, default=0,
                        help="groups, deactivation, steering: fan the units out to this many Ray workers (0: serial, "
                        "here; Ray is an optional extra)")
    parent.add_argument("--ray-address", default=None,
                        help="with --workers: an existing Ray cluster (e.g. auto); default: a local Ray")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (groups, deactivation, steering_curves):
        module.register(sub, parent)
    return p, sub.choices


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:  # smoke counts replace the defaults the user did not override
        for key, value in args.smoke_values.items():
            if getattr(args, key) == subs[args.command].get_default(key):
                setattr(args, key, value)
    args.command_line = common.command_line(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.check(args)
        from ..bundle import Bundle

        args.t0 = time.time()
        bundle = Bundle.load(args.preset, device=args.device,
                             progress=lambda it: tqdm(it, desc="loading SAEs", file=sys.stderr, leave=False,
                                                      disable=args.quiet))
        summary = args.run(args, bundle)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command_line, "wall_seconds": common.elapsed(args),
                      **summary.get("headline", {}), "units": summary.get("units")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
