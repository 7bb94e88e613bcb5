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
    return p


def _register_flow(sub, common):
    from .flow import register
    register(sub, common)


def _register_steer(sub, common):
    from .generate import register
    register(sub, common)


def _register_catalog(sub, common):
    from .catalog import register
    register(sub, common)


def _register_export(sub, common):
    from .export import register
    register(sub, common)


# Subcommands defined beside the code they drive register themselves here.
_REGISTER: list = [_register_flow, _register_steer, _register_catalog, _register_export]


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
