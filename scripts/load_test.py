"""Load test of a running app (loopback only; run by hand, not in CI).

    python app.py --preset default --port 7860 &
    python scripts/load_test.py --url http://127.0.0.1:7860/ --clients 8 --requests 25 --pid $(pgrep -f app.py)

N clients x M requests of /flow and /steer (few tokens) through gradio_client; with
--long-every K every K-th request of a client is a long /steer (--long-samples x --long-tokens,
with the random control). Prints throughput, p50/p95 latency per kind (flow, short steer, long
steer), the error count, the server's RSS before/after and its peak while the test ran (from its
/health endpoint, or /proc with --pid, sampled every 0.5 s; "before" is taken after one warm-up
request of each kind, so one-time caches are not counted as growth) and the steering hooks left
on the model afterwards (must be 0). Bounded in count and in time (--max-seconds).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from urllib.parse import urlparse


def rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--feature", default="12/res/0")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=1800)
    p.add_argument("--pid", type=int, default=None, help="server pid, to report its RSS")
    p.add_argument("--long-every", type=int, default=0, help="every K-th request is a long /steer (0: none)")
    p.add_argument("--long-samples", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=128)
    a = p.parse_args()
    host = urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test a non-loopback address: {host}")
    from gradio_client import Client

    latencies, errors, lock = {"flow": [], "steer": [], "long": []}, [], threading.Lock()
    peak = [0.0]
    deadline = time.time() + a.max_seconds
    probe = Client(a.url, verbose=False)

    def health() -> dict:
        h = probe.predict(api_name="/health")
        return {"rss": rss_mb(a.pid) or h["rss_mb"], "hooks": h["hooks"]}

    probe.predict(a.feature, 0.5, 0.15, "", api_name="/flow")  # warm-up: graph tables, generation buffers
    probe.predict(a.feature, 0.5, 0.15, "activate", "cumulative", -1, 3.0, "exp", -0.25, 1.0, 0, [], [], 0, 1,
                  a.max_new_tokens, "I think ", False, "", False, "", [], api_name="/steer")
    rss0 = health()["rss"]

    def steer(client, seed: int, samples: int, tokens: int, controls: list) -> None:
        client.predict(a.feature, 0.5, 0.15, "activate", "cumulative", -1, 3.0, "exp", -0.25, 1.0, 0, [], [], seed,
                       samples, tokens, "I think ", False, "", False, "", controls, api_name="/steer")

    def worker(i: int) -> None:
        client = Client(a.url, verbose=False)
        for j in range(a.requests):
            if time.time() > deadline:
                return
            t = time.perf_counter()
            long = a.long_every and j % a.long_every == a.long_every - 1
            kind = "long" if long else ("flow" if j % 3 == 0 else "steer")
            try:
                if kind == "flow":
                    client.predict(a.feature, 0.5, 0.15, "", api_name="/flow")
                elif kind == "long":
                    steer(client, i * 1000 + j, a.long_samples, a.long_tokens, ["random"])
                else:
                    steer(client, i * 1000 + j, 1, a.max_new_tokens, [])
                with lock:
                    latencies[kind].append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{kind} {type(e).__name__}: {str(e)[:120]}")

    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(a.pid) or 0.0)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    stop.set()
    after = health()
    rss1 = after["rss"]
    n = sum(len(v) for v in latencies.values())
    print(f"clients {a.clients} x {a.requests} requests; ok: {n}, errors: {len(errors)}, wall {wall:.1f} s, "
          f"throughput {n / wall:.2f} req/s")
    for kind, lat in latencies.items():
        if lat:
            q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
            print(f"  {kind:5s} n={len(lat):3d}  latency p50 {statistics.median(lat):.2f} s, p95 {q[18]:.2f} s")
    if rss0 and rss1:
        print(f"server RSS {rss0:.0f} MB -> {rss1:.0f} MB ({100 * (rss1 - rss0) / rss0:+.1f}%)"
              + (f", peak {peak[0]:.0f} MB" if peak[0] else ""))
    print(f"steering hooks left on the model: {after['hooks']}")
    for e in errors[:10]:
        print("  error:", e)


if __name__ == "__main__":
    main()
