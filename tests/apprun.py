"""Start `python app.py` on a tiny preset for the API and browser tests (loopback only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_FEATURE = "1/res/3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_tiny(out_dir: Path) -> dict:
    """A tiny random preset with a feature catalog and one demo example; returns its paths and a
    word the catalog search finds (so tests search for something that exists)."""
    from steering.bundle import Bundle
    from steering.catalog import Catalog, build_catalog
    from steering.catalog.words import text_words
    from steering.synthetic import make_tiny_preset

    preset = make_tiny_preset(out_dir / "preset", arch="llama", name="tiny-app")
    bundle = Bundle.load(str(preset), device="cpu")
    root = Path(preset).parent / "catalog"
    build_catalog(bundle, n_tokens=2000, ctx=32, batch=16).save(root)
    cat = Catalog.load(bundle)
    word = next(w for layer in bundle.layers for i in range(bundle.width(layer, "res"))
                for t in cat.card(f"{layer}/res/{i}").top_tokens for w in [t.strip().lower()]
                if w.isalpha() and len(w) > 2 and text_words(w) and cat.search(w))  # stop words are refused
    demo = out_dir / "demo_examples.json"
    demo.write_text(json.dumps({"examples": [
        {"title": "Tiny example", "preset": "tiny-app", "feature": TINY_FEATURE, "theme": word,
         "explanation": "A random feature of a random model: only the plumbing is real.",
         "samples": 1, "max_new_tokens": 8},
        {"title": "Tiny pair", "preset": "tiny-app", "feature": f"{TINY_FEATURE}, 2/res/5", "theme": word,
         "explanation": "A seed set: two random features steered together.", "condition": "seed-only",
         "samples": 1, "max_new_tokens": 8}]}))
    return {"preset": str(preset), "bundle": bundle, "catalog": cat, "word": word, "demo_file": str(demo)}


class AppServer:
    """`python app.py --preset ... --port ...` in a subprocess, logging to a file."""

    def __init__(self, preset: str, log_path: Path, env: dict | None = None, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        full_env.pop("OPENAI_API_KEY", None)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--preset", preset, "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=full_env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("app exited during start-up:\n" + log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("app did not start in time:\n" + log_path.read_text()[-4000:])
            time.sleep(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
