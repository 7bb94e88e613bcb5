"""Benchmark: steering, side-by-side variants and flow graphs cost almost nothing (issue 10).

    python -m steering.bench --json            # default preset, CPU or GPU
    python -m steering.bench --gemma-scale     # random Gemma-2-2B-sized model + 78 random 16k SAEs (GPU)

Every figure that has a target is a ratio of two timings taken in the same process, back to back,
with the same batch and settings (machines here are noisy); absolute timings are printed for
context. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TARGETS = {
    "steer_overhead_single": (">=", 0.95),
    "steer_overhead_cumulative": (">=", 0.95),
    "side_by_side_cost": ("<=", 1.6),  # CPU target; 1.2 on GPU
    "flow_ms_cached_median": ("<=", 50.0),
    "bundle_ready_s_warm": ("<=", 8.0),
    "app_first_answer_s_warm": ("<=", 8.0),
    "peak_rss_gb": ("<=", 2.0),
}


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn, repeat: int = 1) -> float:
    """Median seconds of ``repeat`` calls (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cold_start(preset: str, cache: Path | None = None) -> dict:
    """Seconds from a fresh ``python`` process start to the Bundle being ready.

    ``cache`` set to an empty folder measures a first run (GGUF conversion included)."""
    env = dict(os.environ)
    if cache is not None:
        env["FFP_CACHE"] = str(cache)
    code = ("import time,sys; t0=float(sys.argv[1]); from steering.bundle import Bundle; "
            "b=Bundle.load(sys.argv[2]); print(time.time()-t0)")
    out = subprocess.run([sys.executable, "-c", code, str(time.time()), preset], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"cold start failed: {out.stderr[-2000:]}")
    return {"bundle_ready_s": float(out.stdout.strip().splitlines()[-1])}


def app_first_answer(preset: str, port: int = 7891, timeout: float = 600) -> float:
    """Seconds from ``python app.py`` process start to its first answered API request."""
    from gradio_client import Client

    root = Path(__file__).resolve().parent.parent
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--preset", preset, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        while time.time() - t0 < timeout:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                client.predict("wedding", api_name="/search")
                return time.time() - t0
            except Exception as e:  # noqa: BLE001 - the server is not up yet; any failure means retry
                log.debug("app not ready: %s", e)
                time.sleep(0.5)
        raise TimeoutError(f"app did not answer within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@torch.no_grad()
def steering_overhead(bundle, graph, max_new_tokens: int = 32, batch: int = 4, repeat: int = 3) -> dict:
    """tokens/s of steered generation (single layer; cumulative over the whole flow graph) divided
    by tokens/s of plain ``model.generate`` with the same batch, prompt and greedy settings."""
    from .steer import plan, steering

    enc = bundle.tokenize(["I think "] * batch)
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=bundle.tokenizer.pad_token_id)

    def plain():
        with bundle.lock:
            bundle.model.generate(**enc, **kw)

    def steered(specs):
        def run():
            with steering(bundle, [specs] * batch, enc["attention_mask"]):
                bundle.model.generate(**enc, **kw)
        return run

    single = plan(graph, "single", strength=3.0)
    cumulative = plan(graph, "cumulative", layer=graph.l_end, strength=3.0, alpha=-0.25)
    # interleave the three so drift on a noisy machine hits all of them alike
    t = {"plain": [], "single": [], "cumulative": []}
    fns = {"plain": plain, "single": steered(single), "cumulative": steered(cumulative)}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            t[name].append(_timed(fn, 1))
    med = {k: statistics.median(v) for k, v in t.items()}
    toks = batch * max_new_tokens
    return {"plain_tokens_per_s": toks / med["plain"], "single_tokens_per_s": toks / med["single"],
            "cumulative_tokens_per_s": toks / med["cumulative"],
            "steer_overhead_single": med["plain"] / med["single"],
            "steer_overhead_cumulative": med["plain"] / med["cumulative"],
            "n_specs_single": len(single), "n_specs_cumulative": len(cumulative)}


def side_by_side_cost(bundle, graph, max_new_tokens: int = 32, repeat: int = 3) -> dict:
    """Wall time of baseline + 3 steered variants in ONE batched call / one plain generation."""
    from .generate import generate_variants
    from .steer import plan

    variants = {"baseline": [], "initial": plan(graph, "baseline", strength=3.0),
                "single": plan(graph, "single", strength=3.0),
                "cumulative": plan(graph, "cumulative", layer=graph.l_end, strength=3.0, alpha=-0.25)}
    enc = bundle.tokenize(["I think "])
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=bundle.tokenizer.pad_token_id)

    def one():
        with bundle.lock:
            bundle.model.generate(**enc, **kw)

    def four():
        generate_variants(bundle, "I think ", variants, [0], max_new_tokens, temperature=0.0, metrics=False)

    t1, t4 = [], []
    for _ in range(repeat):
        t1.append(_timed(one, 1))
        t4.append(_timed(four, 1))
    return {"one_generation_s": statistics.median(t1), "four_variants_batched_s": statistics.median(t4),
            "side_by_side_cost": statistics.median(t4) / statistics.median(t1)}


def flow_latency(bundle, n: int = 200, seed: int = 0) -> dict:
    """Flow-graph latency: building every match table (uncached), then graphs of random residual
    features from cached tables (median, p95)."""
    import random

    from .flow import build_flow_graph, build_tables

    for key in [k for k in bundle._cache if k[0] == "match"]:
        del bundle._cache[key]
    t = time.perf_counter()
    n_tables = build_tables(bundle)
    tables_s = time.perf_counter() - t
    rng = random.Random(seed)
    times = []
    for _ in range(n):
        l = rng.choice(bundle.layers)
        f = f"{l}/res/{rng.randrange(bundle.width(l, 'res'))}"
        t = time.perf_counter()
        build_flow_graph(bundle, f)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"match_tables": n_tables, "match_tables_s": tables_s, "flow_ms_cached_median": statistics.median(times),
            "flow_ms_cached_p95": times[int(0.95 * len(times)) - 1], "flow_graphs": n}


def check_targets(result: dict) -> dict:
    flat = {}
    for v in result.values():
        if isinstance(v, dict):
            flat.update(v)
    out = {}
    for name, (op, target) in TARGETS.items():
        if name in flat:
            value = flat[name]
            out[name] = {"value": round(value, 4), "target": f"{op} {target}",
                         "met": value >= target if op == ">=" else value <= target}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--json", action="store_true")
    p.add_argument("--feature", default=None, help="seed feature for steering timings")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--skip-cold-start", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from .bundle import Bundle
    from .flow import build_flow_graph

    result: dict = {"preset": a.preset, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                                                    else None}}
    if not a.skip_cold_start:
        result["cold_start"] = {"bundle_ready_s_warm": cold_start(a.preset)["bundle_ready_s"]}
    t = time.perf_counter()
    bundle = Bundle.load(a.preset)
    result["load_in_process_s"] = time.perf_counter() - t
    result["flow"] = flow_latency(bundle)
    seed = a.feature or max(((f"{l}/res/{i}", build_flow_graph(bundle, f"{l}/res/{i}")) for l in
                             (bundle.n_layers // 2,) for i in range(0, 64, 8)),
                            key=lambda kv: len(kv[1].nodes))[0]
    graph = build_flow_graph(bundle, seed)
    result["seed_feature"] = seed
    result["steering"] = steering_overhead(bundle, graph, a.max_new_tokens)
    result["side_by_side"] = side_by_side_cost(bundle, graph, a.max_new_tokens)
    result["memory"] = {"peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        result["memory"]["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["targets"] = check_targets(result)
    if a.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        for name, r in result["targets"].items():
            print(f"{name:32s} {r['value']:>10.3f}   target {r['target']:>8s}   {'met' if r['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
