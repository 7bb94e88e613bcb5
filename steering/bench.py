"""Benchmark: steering, side-by-side variants and flow graphs cost almost nothing (issue 10).

    python -m steering bench --json            # default preset, CPU or GPU
    python -m steering bench --gemma-scale     # random Gemma-2-2B-sized model + 78 random 16k SAEs (GPU)

Every figure that has a target is a ratio of two timings taken in the same process, back to back,
with the same batch and settings (machines here are noisy); absolute timings are printed for
context. Nothing here is asserted in tests.
"""

from __future__ import annotations

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
    "steer_overhead_all_sites": (">=", 0.95),
    "side_by_side_cost": ("<=", 1.6),  # CPU target; 1.2 on GPU
    "flow_ms_cached_median": ("<=", 50.0),
    "bundle_ready_s_first_run": ("<=", 20.0),
    "bundle_ready_s_warm": ("<=", 8.0),
    "app_first_answer_s_first_run": ("<=", 20.0),
    "app_first_answer_s_warm": ("<=", 8.0),
    "peak_rss_gb": ("<=", 2.0),
}
GPU_TARGETS = {  # where the GPU target differs, and the Gemma-scale figures (issue 10)
    "side_by_side_cost": ("<=", 1.2),
    "bundle_gpu_gb": ("<=", 20.0),
    "flow_ms_uncached_median": ("<=", 200.0),
    "flow_ms_cached_median": ("<=", 20.0),
    "decode_fraction_of_bandwidth_limit": (">=", 0.20),
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


def app_first_answer(preset: str, port: int = 7891, timeout: float = 600, cache: Path | None = None) -> float:
    """Seconds from ``python app.py`` process start to its first answered API request (``cache``: as
    in `cold_start`)."""
    from gradio_client import Client

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    if cache is not None:
        env["FFP_CACHE"] = str(cache)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--preset", preset, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while time.time() - t0 < timeout:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                client.predict(api_name="/health")
                return time.time() - t0
            except Exception as e:  # noqa: BLE001 - the server is not up yet; any failure means retry
                log.debug("app not ready: %s", e)
                time.sleep(0.5)
        raise TimeoutError(f"app did not answer within {timeout} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@torch.no_grad()
def steering_overhead(bundle, graph, max_new_tokens: int = 32, batch: int = 4, repeat: int = 5) -> dict:
    """tokens/s of steered generation (single layer; cumulative over the whole flow graph) divided
    by tokens/s of plain ``model.generate`` with the same batch, prompt and greedy settings."""
    from .features import FeatureId
    from .steer import SteerSpec, plan, steering

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
    every_site = [SteerSpec(FeatureId(l, s, 0), 1.0) for l, s in sorted(bundle.saes)]  # worst case: all sites hooked
    # interleave them so drift on a noisy machine hits all of them alike
    t = {"plain": [], "single": [], "cumulative": [], "all_sites": []}
    fns = {"plain": plain, "single": steered(single), "cumulative": steered(cumulative),
           "all_sites": steered(every_site)}
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
            "steer_overhead_all_sites": med["plain"] / med["all_sites"],
            "n_specs_single": len(single), "n_specs_cumulative": len(cumulative), "n_specs_all_sites": len(every_site),
            "batch": batch, "max_new_tokens": max_new_tokens, "repeat": repeat}


def side_by_side_cost(bundle, graph, max_new_tokens: int = 32, repeat: int = 3) -> dict:
    """Wall time of unsteered + 3 steered variants in ONE batched call / one plain generation."""
    from .generate import generate_variants
    from .steer import plan

    variants = {"unsteered": [], "seed-only": plan(graph, "seed-only", strength=3.0),
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

    enc4 = bundle.tokenize(["I think "] * len(variants))

    def plain_batch():  # what batching alone costs: the same rows, no steering, no bookkeeping
        with bundle.lock:
            bundle.model.generate(**enc4, **kw)

    t1, t4, tb = [], [], []
    for _ in range(repeat):
        t1.append(_timed(one, 1))
        t4.append(_timed(four, 1))
        tb.append(_timed(plain_batch, 1))
    m1, m4, mb = statistics.median(t1), statistics.median(t4), statistics.median(tb)
    return {"one_generation_s": m1, "four_variants_batched_s": m4, "side_by_side_cost": m4 / m1,
            "plain_batch_of_4_cost": mb / m1, "variants_vs_plain_batch": m4 / mb}


def flow_latency(bundle, n: int = 200, seed: int = 0) -> dict:
    """Flow-graph latency: building every match table (uncached), then graphs of random residual
    features from cached tables (median, p95)."""
    import random

    from .flow import build_flow_graph, build_tables

    bundle.drop_cached(lambda k: k[0] != "match")
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


def flow_uncached(bundle, n: int = 5, seed: int = 1) -> dict:
    """Latency of one flow graph with nothing cached (the match tables it needs computed on the
    spot), median over ``n`` random residual seeds, the cache cleared before each."""
    import random

    from .flow import build_flow_graph

    rng = random.Random(seed)
    times = []
    for _ in range(n):
        bundle.drop_cached(lambda k: k[0] != "match")
        l = rng.choice(bundle.layers)
        t = time.perf_counter()
        build_flow_graph(bundle, f"{l}/res/{rng.randrange(bundle.width(l, 'res'))}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return {"flow_ms_uncached_median": statistics.median(times), "flow_uncached_graphs": n}


def check_targets(result: dict, gpu: bool = False) -> dict:
    flat = {}
    for v in result.values():
        if isinstance(v, dict):
            flat.update(v)
    targets = {**TARGETS, **(GPU_TARGETS if gpu else {})}
    out = {}
    for name, (op, target) in targets.items():
        if name in flat:
            value = flat[name]
            out[name] = {"value": round(value, 4), "target": f"{op} {target}",
                         "met": value >= target if op == ">=" else value <= target}
    return out


def run(a) -> dict:
    """Every figure of one benchmark run (``a``: the parsed ``python -m steering bench`` options)."""
    from .bundle import Bundle
    from .flow import build_flow_graph

    result: dict = {"preset": a.preset, "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                                                    else None}}
    if a.gemma_scale:
        return gemma_scale(a)
    if not a.skip_cold_start:
        import tempfile

        with tempfile.TemporaryDirectory() as c1, tempfile.TemporaryDirectory() as c2:
            result["cold_start"] = {  # empty cache folders: a first run converts the GGUF again
                "bundle_ready_s_first_run": cold_start(a.preset, Path(c1))["bundle_ready_s"],
                "bundle_ready_s_warm": cold_start(a.preset)["bundle_ready_s"],
                "app_first_answer_s_first_run": app_first_answer(a.preset, cache=Path(c2)),
                "app_first_answer_s_warm": app_first_answer(a.preset)}
    t = time.perf_counter()
    bundle = Bundle.load(a.preset)
    result["load_in_process_s"] = time.perf_counter() - t
    result["flow"] = {**flow_uncached(bundle), **flow_latency(bundle)}
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
    result["targets"] = check_targets(result, gpu=torch.cuda.is_available())
    return result


def targets_table(result: dict) -> str:
    """The readable report: one line per target."""
    return "\n".join(f"{name:36s} {r['value']:>10.3f}   target {r['target']:>8s}   {'met' if r['met'] else 'NOT met'}"
                     for name, r in result["targets"].items())


@torch.no_grad()
def decode_rate(bundle, max_new_tokens: int, compile_static: bool = False, repeat: int = 3) -> dict:
    """Batch-1 greedy decoding tokens/s, plain and steered (cumulative over 3 sites of every layer is
    the heaviest case), with a dynamic cache or a static cache + ``torch.compile``."""
    from .features import FeatureId
    from .steer import SteerSpec, steering

    enc = bundle.tokenize(["I think "])
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=bundle.tokenizer.pad_token_id)
    if compile_static:
        kw["cache_implementation"] = "static"
        bundle.model.forward = torch.compile(bundle.model.forward, mode="reduce-overhead", fullgraph=False)
    specs = [SteerSpec(FeatureId(l, s, 0), 1.0) for l, s in sorted(bundle.saes)]

    def plain():
        bundle.model.generate(**enc, **kw)

    def steered():
        with steering(bundle, [specs], enc["attention_mask"]):
            bundle.model.generate(**enc, **kw)

    plain(), steered()  # warm-up (compilation happens here)
    tp, ts = [], []
    for _ in range(repeat):
        tp.append(_timed(plain, 1))
        ts.append(_timed(steered, 1))
    tp_med, ts_med = statistics.median(tp), statistics.median(ts)
    return {"tokens_per_s_plain": max_new_tokens / tp_med, "tokens_per_s_steered_all_sites": max_new_tokens / ts_med,
            "steer_overhead_decode": tp_med / ts_med, "static_cache_compiled": compile_static}


def gemma_scale(a) -> dict:
    """``--gemma-scale``: a random model with Gemma 2 2B's architecture and sizes and random 16k SAEs
    at every (layer, site) (`synthetic.gemma_scale_bundle`): bundle memory, flow latency uncached and
    cached, steering overhead, batch-1 decoding as a fraction of the memory-bandwidth limit (GPU)."""
    from .flow import build_flow_graph
    from .synthetic import gemma_scale_bundle

    gpu = torch.cuda.is_available()
    t = time.perf_counter()
    bundle = gemma_scale_bundle(n_layers=a.layers, d_model=a.d_model, width=a.width, vocab_size=a.vocab)
    result: dict = {"preset": "gemma-2-2b-synthetic", "sizes": {"layers": a.layers, "d_model": a.d_model,
                                                                "width": a.width, "vocab": a.vocab},
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                "cuda": torch.cuda.get_device_name() if gpu else None},
                    "build_s": time.perf_counter() - t}
    weight_bytes = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
    sae_bytes = sum(p.numel() * p.element_size() for sae in bundle.saes.values() for p in sae.parameters())
    result["memory"] = {"model_gb": weight_bytes / 2**30, "saes_gb": sae_bytes / 2**30}
    if gpu:
        torch.cuda.synchronize()
        result["memory"]["bundle_gpu_gb"] = torch.cuda.memory_allocated() / 2**30
    result["flow"] = {**flow_uncached(bundle), **flow_latency(bundle, n=50)}
    seed = f"{a.layers // 2}/res/0"
    graph = build_flow_graph(bundle, seed)
    result["steering"] = steering_overhead(bundle, graph, a.max_new_tokens, batch=1)
    result["side_by_side"] = side_by_side_cost(bundle, graph, a.max_new_tokens)
    result["decode"] = decode_rate(bundle, a.max_new_tokens)
    if a.compile:
        result["decode_static_compiled"] = decode_rate(bundle, a.max_new_tokens, compile_static=True)
    if gpu:
        best = max(result["decode"]["tokens_per_s_steered_all_sites"],
                   result.get("decode_static_compiled", {}).get("tokens_per_s_steered_all_sites", 0.0))
        limit = a.hbm_gbps * 1e9 / weight_bytes  # tokens/s if every step only read the weights once
        result["decode"]["bandwidth_limit_tokens_per_s"] = limit
        result["decode"]["decode_fraction_of_bandwidth_limit"] = best / limit
        result["memory"]["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["memory"]["peak_rss_gb"] = peak_rss_gb()
    result["targets"] = {k: v for k, v in check_targets(result, gpu).items() if k not in ("peak_rss_gb",)}
    return result


if __name__ == "__main__":  # the old entry point, kept for one release: it runs `python -m steering bench`
    import runpy

    log.warning("python -m steering.bench is deprecated; use python -m steering bench")
    sys.argv = ["python -m steering", "bench", *sys.argv[1:]]
    runpy.run_module("steering", run_name="__main__")
