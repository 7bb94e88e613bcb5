"""Concurrent users, one model: their generation requests merged into one batched call (issue 21).

Requests that arrive within ``window_s`` of each other with the same prompt and the same
generation settings (new tokens, temperature, top-p, chat, instruction) become the rows of one
`generate.generate_rows` call, up to ``max_rows`` rows. Each row keeps its own sampler seed and
its own steering specs, so a user's texts are those of running alone (tested); their local
metrics are filtered back to the features of that user's own request. Requests that cannot be
merged run as their own batch. Used by the app (`steering.ui.Playground`); the library and the
CLI call `generate_variants` directly.

Batches take turns on the model shortest first (cost = rows x (prompt + new tokens)), so a short
request waits for the batch already running, not for the long ones queued before it; waiting
ages a batch (`AGING`), so a steady stream of short requests cannot hold a long one back for
ever. A merged batch stays within the per-request budget `limits.MAX_COST`.

On the 2-core CPU a batch of r rows costs less than r separate calls (the weights are read once
per decoding step for all rows); docs/performance.md has the load test before and after.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field

from . import limits
from .generate import Generation, check_request, generate_rows
from .settings import SCOPES, TEMPERATURE, TOP_P, check_choice
from .steer import SteerSpec, _check_steerable

log = logging.getLogger(__name__)
AGING = 150.0  # token-rows per second of waiting: about what the 2-core default generates per second


@dataclass
class _Group:
    key: tuple
    rows: list = field(default_factory=list)  # (request id, variant, seed, specs)
    features: dict = field(default_factory=dict)  # request id -> its features (str)
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None
    streams: dict = field(default_factory=dict)  # request id -> (its on_tokens, its row indices)

    cost: int = 0  # token-rows of the rows so far

    def dispatch(self, names: list, rows: list) -> None:
        """One merged decoding step, passed on to every streaming request as its own rows; a
        request whose callback fails stops being streamed (its batch mates are not affected)."""
        for rid, (cb, idx) in list(self.streams.items()):
            try:
                cb([(names[i][0].split("\x00", 1)[1], names[i][1]) for i in idx], [rows[i] for i in idx])
            except Exception:  # noqa: BLE001 - one user's display must not stop the others' generation
                log.exception("streaming to request %s failed; it gets its texts at the end", rid)
                self.streams.pop(rid, None)


class GenerationBatcher:
    """Merge concurrent `generate_variants`-style calls on one bundle (module docstring).

    ``window_s``: how long the first request of a batch waits for others (seconds);
    ``max_rows``: rows per merged call (default `limits.MAX_ROWS`).
    ``calls`` counts the merged generate calls made (for tests and the load test).
    """

    def __init__(self, bundle, window_s: float = 0.05, max_rows: int | None = None):
        self.bundle, self.window_s = bundle, window_s
        self.max_rows = max_rows or limits.MAX_ROWS
        self._lock = threading.Lock()
        self._open: list[_Group] = []
        self._next_id = 0
        self.calls = 0
        # Turn-taking between batches: the cheapest waiting batch runs next (shortest job first),
        # so a short request is not stuck behind long ones queued before it (issue 20); waiting
        # ages a batch (AGING token-rows per second), so a long one is not held back for ever.
        self._turn = threading.Condition()
        self._waiting: list[tuple[float, int]] = []  # heap of (aged cost, arrival order)
        self._running = False
        self._t0 = time.monotonic()

    def _wait_turn(self, cost: int, order: int) -> None:
        """Block until no batch runs and this one has the lowest aged cost: its cost in token-rows
        plus AGING x its arrival time in seconds (a batch that arrived 10 s earlier counts as
        1,500 token-rows cheaper), ties first come."""
        entry = (cost + AGING * (time.monotonic() - self._t0), order)
        with self._turn:
            heapq.heappush(self._waiting, entry)
            while self._running or self._waiting[0] != entry:
                self._turn.wait()
            heapq.heappop(self._waiting)
            self._running = True

    def generate_variants(self, bundle, prompt: str, variants: dict[str, list[SteerSpec]], seeds: list[int],
                          max_new_tokens: int = 36, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                          chat: bool = False, metrics: bool = True, instruction: str | None = None,
                          on_tokens=None, scope: str = "all") -> list[Generation]:
        """Same signature and result as `generate.generate_variants` (``bundle`` must be this
        batcher's bundle)."""
        if bundle is not self.bundle:
            raise ValueError("this batcher serves another bundle")
        if not variants or not seeds:
            raise ValueError("no variants to generate" if not variants else "seeds is empty; give at least one seed")
        mine = [(name, seed, variants[name]) for name in variants for seed in seeds]
        for s in seeds:  # this request's own errors are raised here, before it joins a batch
            limits.check_int("seed", s, 0, limits.MAX_SEED)
        limits.check_steer_args(temperature=temperature, top_p=top_p)
        _, prompt_ids = check_request(self.bundle, prompt, max_new_tokens, len(mine), chat, instruction)
        for specs in variants.values():
            for spec in specs:
                _check_steerable(self.bundle, spec.feature)
        check_choice("scope", scope, SCOPES)
        key = (prompt, max_new_tokens, float(temperature), float(top_p), bool(chat), metrics, instruction, scope)
        feats = sorted({str(s.feature) for specs in variants.values() for s in specs})
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            cost = len(mine) * (len(prompt_ids) + max_new_tokens)
            group = next((g for g in self._open if g.key == key and len(g.rows) + len(mine) <= self.max_rows
                          and g.cost + cost <= max(limits.MAX_COST, cost)), None)
            leader = group is None
            if leader:
                group = _Group(key)
                self._open.append(group)
            group.cost += cost
            first = len(group.rows)
            group.rows += [(rid, *r) for r in mine]
            group.features[rid] = feats
            if on_tokens is not None:
                group.streams[rid] = (on_tokens, range(first, first + len(mine)))
        if leader:
            time.sleep(self.window_s)  # let the requests arriving now join this batch
            with self._lock:  # closed: later requests start a batch of their own
                self._open.remove(group)
            try:
                self._wait_turn(group.cost, rid)
                try:
                    rows = [(f"{r[0]}\x00{r[1]}", r[2], r[3]) for r in group.rows]  # request id + variant
                    group.result = generate_rows(self.bundle, prompt, rows, max_new_tokens, temperature, top_p,
                                                 chat, metrics, instruction,
                                                 group.dispatch if group.streams else None, scope)
                finally:
                    with self._turn:
                        self._running = False
                        self.calls += 1
                        self._turn.notify_all()
                if len(group.features) > 1:
                    log.info("batched %d requests into one call of %d rows", len(group.features), len(group.rows))
            except BaseException as e:  # every request of the batch sees the error
                group.error = e
            finally:
                group.done.set()
        else:
            group.done.wait()
        if group.error is not None:
            raise group.error
        out = []
        for (r, *_), g in zip(group.rows, group.result):
            if r != rid:
                continue
            g = Generation(g.variant.split("\x00", 1)[1], g.seed, g.text, list(g.token_ids), dict(g.metrics))
            for key in ("feature_activation", "feature_active_tokens"):
                if key in g.metrics:
                    g.metrics[key] = {k: v for k, v in g.metrics[key].items() if k in group.features[rid]}
            out.append(g)
        return out
