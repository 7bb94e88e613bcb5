"""Issue 21: concurrent users' requests batched into one generate call; each user's result equals
running alone, bit for bit."""

import threading

import pytest

from steering import generate as G
from steering.batching import GenerationBatcher
from steering.features import parse_feature
from steering.sites import count_hooks
from steering.steer import SteerSpec

REQUESTS = [  # (variants, seeds): different users, different steering, seeds and sample counts
    ({"unsteered": [], "steered": [SteerSpec(parse_feature("1/res/3"), 4.0)]}, [0, 1]),
    ({"steered": [SteerSpec(parse_feature("2/mlp/5"), -3.0)]}, [7]),
    ({"unsteered": [], "steered": [SteerSpec(parse_feature("0/res/1"), 0.0, mode="rescale")],
      "random": [SteerSpec(parse_feature("1/res/3"), 4.0, direction_seed=5)]}, [2, 3, 4]),
    ({"steered": [SteerSpec(parse_feature("1/attn/2"), 6.0), SteerSpec(parse_feature("2/res/3"), 2.0)]}, [1]),
]


def _concurrently(fns):
    out, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out, errors


@pytest.mark.parametrize("temperature", [1.27, 0.0])
def test_batched_requests_equal_each_request_alone(tiny_bundle, temperature):
    alone = [G.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=8, temperature=temperature)
             for v, s in REQUESTS]
    b = GenerationBatcher(tiny_bundle, window_s=0.5)
    got, errors = _concurrently([lambda v=v, s=s: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=8,
                                                                       temperature=temperature) for v, s in REQUESTS])
    assert not errors, errors
    assert b.calls == 1  # all four users in one batch
    for want, have in zip(alone, got):
        assert [g.to_json() for g in have] == [g.to_json() for g in want]
    assert count_hooks(tiny_bundle.model) == 0


def test_different_prompts_or_settings_are_not_merged(tiny_bundle):
    b = GenerationBatcher(tiny_bundle, window_s=0.3)
    v, s = REQUESTS[0]
    got, errors = _concurrently([
        lambda: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=6),
        lambda: b.generate_variants(tiny_bundle, "The cat ", v, s, max_new_tokens=6),
        lambda: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=5)])
    assert not errors and b.calls == 3
    assert [g.to_json() for g in got[1]] == [g.to_json() for g in
                                            G.generate_variants(tiny_bundle, "The cat ", v, s, max_new_tokens=6)]


def test_one_users_bad_request_fails_alone(tiny_bundle):
    b = GenerationBatcher(tiny_bundle, window_s=0.3)
    v, s = REQUESTS[0]
    got, errors = _concurrently([
        lambda: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=6),
        lambda: b.generate_variants(tiny_bundle, "I think ", v, [-1], max_new_tokens=6)])
    assert len(errors) == 1 and "seed" in str(errors[0])
    assert [g.to_json() for g in got[0]] == [g.to_json() for g in
                                            G.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=6)]


def test_one_users_invalid_feature_fails_alone(tiny_bundle):
    from steering.features import FeatureId

    b = GenerationBatcher(tiny_bundle, window_s=0.3)
    v, s = REQUESTS[1]
    bad = {"steered": [SteerSpec(FeatureId(1, "res", 10_000), 1.0)]}
    got, errors = _concurrently([lambda: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=6),
                                 lambda: b.generate_variants(tiny_bundle, "I think ", bad, s, max_new_tokens=6)])
    assert len(errors) == 1 and "valid indices" in str(errors[0]) and got[0] is not None


def test_rows_over_the_batch_limit_start_a_new_batch(tiny_bundle):
    b = GenerationBatcher(tiny_bundle, window_s=0.3, max_rows=4)
    v, s = REQUESTS[0]  # 4 rows each
    got, errors = _concurrently([lambda: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=4)] * 2)
    assert not errors and b.calls == 2 and got[0] == got[1]


def _cut(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


def test_streamed_rows_end_as_the_generated_texts(tiny_bundle):
    """Issue 17: on_tokens gets every row after every step; the last call holds each row's tokens."""
    seen = []
    v, s = REQUESTS[0]
    gens = G.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=8,
                               on_tokens=lambda names, rows: seen.append((list(names), [list(r) for r in rows])))
    assert 1 <= len(seen) <= 8 and [len(r) for r in seen[0][1]] == [1] * len(gens)
    names, rows = seen[-1]
    eos = tiny_bundle.tokenizer.eos_token_id
    assert names == [(g.variant, g.seed) for g in gens]
    assert [_cut(r, eos) for r in rows] == [g.token_ids for g in gens]


def test_batched_requests_stream_their_own_rows(tiny_bundle):
    b = GenerationBatcher(tiny_bundle, window_s=0.5)
    streams = [[], []]
    fns = [lambda i=i, v=v, s=s: b.generate_variants(tiny_bundle, "I think ", v, s, max_new_tokens=6,
                                                     on_tokens=lambda n, r, i=i: streams[i].append((n, r)))
           for i, (v, s) in enumerate(REQUESTS[:2])]
    got, errors = _concurrently(fns)
    assert not errors and b.calls == 1
    eos = tiny_bundle.tokenizer.eos_token_id
    for stream, gens in zip(streams, got):
        names, rows = stream[-1]
        assert names == [(g.variant, g.seed) for g in gens]
        assert [_cut(list(r), eos) for r in rows] == [g.token_ids for g in gens]


def test_the_cheapest_waiting_batch_runs_next(tiny_bundle, monkeypatch):
    """Issue 20: while a long batch runs, a long and then a short request arrive; the short one
    runs before the long one that queued first."""
    import time

    from steering import batching as B

    order, real = [], B.generate_rows

    def slow(bundle, prompt, rows, *a, **k):
        order.append(len(rows))
        time.sleep(0.6)
        return real(bundle, prompt, rows, *a, **k)

    monkeypatch.setattr(B, "generate_rows", slow)
    b = GenerationBatcher(tiny_bundle, window_s=0.01)
    long_v = {"a": [], "b": [SteerSpec(parse_feature("1/res/3"), 2.0)]}

    def req(variants, seeds, tokens, delay):
        time.sleep(delay)
        return b.generate_variants(tiny_bundle, "I think ", variants, seeds, max_new_tokens=tokens)

    got, errors = _concurrently([lambda: req(long_v, [0, 1, 2, 3], 6, 0.0),   # 8 rows, runs first
                                 lambda: req(long_v, [4, 5, 6, 7], 5, 0.2),   # 8 rows, queues
                                 lambda: req({"c": []}, [9], 4, 0.4)])        # 1 row, queues later
    assert not errors and order == [8, 1, 8]
