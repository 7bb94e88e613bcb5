"""Shared pieces of the experiment commands: output folders, the command line that regenerates a
result, resumable units, held-out texts of the four domains, and figure saving.

Resumability: each finished unit of work (a domain of the groups analysis, one r of the
deactivation protocol, one (theme, condition, strength) batch of the steering runs) is written as
``<out>/<command>/units/<name>.json`` holding the unit's own settings and its result. A rerun
with the same settings reads the file instead of recomputing; different settings recompute it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

log = logging.getLogger(__name__)
PROG = "python -m steering.experiments"


def command_line(argv: list[str] | None = None) -> str:
    """The exact command line that regenerates a result (recorded in every JSON)."""
    return " ".join([PROG, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def preset_slug(bundle) -> str:
    """Folder name of a preset's results: its name, made safe for a path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", bundle.preset.name) or "preset"


def out_dir(out: str | None, bundle, command: str) -> Path:
    """``<out>/<command>``, ``out`` defaulting to ``results/<preset name>``."""
    root = Path(out) if out else Path("results") / preset_slug(bundle)
    path = root / command
    (path / "units").mkdir(parents=True, exist_ok=True)
    return path


def sae_fingerprint(bundle) -> str:
    """A short hash of every weight of every SAE (encoder, decoder, biases): it changes when any
    latent of any SAE changes. (It hashed the first 4 decoder rows until session 13, and the
    MLP SAEs whose dead latents were revived got the old units back.)"""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(bundle.saes):
        h.update(str(key).encode())
        sae = bundle.sae(*key)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            h.update(getattr(sae, name).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(obj):
    """JSON round trip: tuples become lists, so settings compare equal to what a file holds."""
    return json.loads(json.dumps(obj, default=str))


def write_json(path: Path, data: dict) -> Path:
    """Write indented JSON atomically (a killed run never leaves half a unit file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


class Units:
    """Resumable units under ``folder``: `get` returns a cached result when the unit's file holds
    the same settings, else computes, writes and returns it. ``computed`` and ``reused`` count
    what happened (the CLI reports them; tests check a rerun computes nothing)."""

    def __init__(self, folder: Path, command: str, saes: str = ""):
        # ``saes``: a fingerprint of the SAE weights (`sae_fingerprint`), part of every unit's
        # settings, so results of other SAEs are never reused
        self.folder, self.command, self.saes = Path(folder), command, saes
        self.computed: list[str] = []
        self.reused: list[str] = []

    def path(self, name: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9=._+-]+", "_", name) + ".json")

    def _settings(self, settings: dict) -> dict:
        return _plain({**settings, "saes": self.saes} if self.saes else settings)

    def cached(self, name: str, settings: dict) -> dict | None:
        """The stored result of a unit computed with these settings, or None (counted as reused)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            log.warning("unit file %s is unreadable (%s); recomputing it", path, e)
            return None
        if data.get("settings") == self._settings(settings) and "result" in data:
            self.reused.append(name)
            return data["result"]
        log.info("unit %s was computed with other settings; recomputing", name)
        return None

    def put(self, name: str, settings: dict, result: dict) -> dict:
        """Store a computed unit (atomically) and return its result as JSON would."""
        result = _plain(result)
        write_json(self.path(name), {"unit": name, "command": self.command, "settings": self._settings(settings),
                                     "result": result})
        self.computed.append(name)
        return result

    def get(self, name: str, settings: dict, compute: Callable[[], dict]) -> dict:
        hit = self.cached(name, settings)
        return hit if hit is not None else self.put(name, settings, compute())

    def report(self) -> dict:
        return {"computed": len(self.computed), "reused": len(self.reused), "folder": str(self.folder)}


def progress(desc: str, total: int | None = None, disable: bool = False) -> Callable[[Iterable], Iterable]:
    """A tqdm wrapper on stderr for the library's ``progress=`` arguments."""
    return lambda it: tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, disable=disable)


# ---- texts --------------------------------------------------------------------------------

def passages(doc: str, chars: int) -> list[str]:
    """Split a document into passages of about ``chars`` characters at whitespace."""
    out, start = [], 0
    while start < len(doc):
        end = min(len(doc), start + chars)
        if end < len(doc):
            cut = doc.rfind(" ", start + chars // 2, end)
            end = cut if cut > start else end
        piece = doc[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


def domain_texts(domain: str, n: int, seed: int, chars: int = 1000, min_chars: int = 200,
                 split: str = "heldout") -> list[str]:
    """``n`` random held-out passages of one domain (the paper's "random samples per dataset",
    §5.1/App. A.1). Held-out documents (``steering.training.corpus``: every 50th, never seen by
    the SAEs) are cut into passages of ~``chars`` characters, so small domains (stories has 2
    held-out documents) still give several texts; fewer than ``n`` are returned when the domain
    has fewer passages (the count is recorded with the results)."""
    from ..training import corpus

    docs = corpus.load_domain(domain, split)
    pool = [p for d in docs for p in passages(d, chars) if len(p) >= min_chars]
    rng = random.Random(f"{domain}:{seed}")
    return rng.sample(pool, min(n, len(pool)))


# ---- figures ------------------------------------------------------------------------------

def has_kaleido() -> bool:
    import importlib.util

    return importlib.util.find_spec("kaleido") is not None


def save_figure(fig, path: Path) -> list[str]:
    """Write ``path`` (.html, plotly loaded from its CDN to keep files small) and a PNG beside it
    when kaleido is installed. Returns the written file names."""
    path = Path(path)
    fig.write_html(str(path), include_plotlyjs="cdn", full_html=True)
    names = [path.name]
    if has_kaleido():
        png = path.with_suffix(".png")
        fig.write_image(str(png), width=1100, height=650)
        names.append(png.name)
    return names


def parse_floats(text: str, name: str) -> list[float]:
    """A comma-separated list of numbers from a CLI option; errors name the option."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{name} must be comma-separated numbers, e.g. '4,8,16'; got {text!r}") from e
    if not vals:
        raise ValueError(f"{name} is empty; give comma-separated numbers")
    return vals


def parse_ints(text: str, name: str) -> list[int]:
    vals = parse_floats(text, name)
    if any(v != int(v) for v in vals):
        raise ValueError(f"{name} must be whole numbers, got {text!r}")
    return [int(v) for v in vals]


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def elapsed(args) -> float:
    """Seconds since the command started (model loading included), for the summaries."""
    import time

    return round(time.time() - getattr(args, "t0", time.time()), 1)
