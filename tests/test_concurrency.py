"""Isolation under concurrency: concurrent steering requests give exactly what they give alone,
and no hook is left on the model afterwards (issue 11)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from steering.features import FeatureId
from steering.generate import generate_variants
from steering.sites import count_hooks
from steering.steer import SteerSpec

FEATURES = [FeatureId(l, s, i) for l, s, i in [(0, "res", 3), (1, "res", 7), (2, "mlp", 5), (1, "attn", 2),
                                               (2, "res", 11), (0, "mlp", 1), (1, "res", 40), (2, "attn", 9)]]


def _one(bundle, i: int, fail: bool = False):
    specs = [SteerSpec(FEATURES[i], 5.0 + i)]
    if fail:
        specs = [SteerSpec(FeatureId(1, "res", 10_000), 1.0)]  # invalid index: raises inside the request
    return generate_variants(bundle, "I think ", {"steered": specs}, seeds=[i], max_new_tokens=6, metrics=False)


def test_concurrent_requests_equal_sequential_and_leave_no_hooks(tiny_bundle):
    alone = [_one(tiny_bundle, i)[0].token_ids for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_one, tiny_bundle, i, fail=(i == 3)) for i in range(8)]
        together = []
        for i, f in enumerate(futures):
            if i == 3:
                with pytest.raises(ValueError, match="valid indices"):
                    f.result()
                together.append(None)
            else:
                together.append(f.result()[0].token_ids)
    assert [t for i, t in enumerate(together) if i != 3] == [t for i, t in enumerate(alone) if i != 3]
    assert count_hooks(tiny_bundle.model) == 0
    # a later unsteered request is unaffected by everything before it
    base_again = generate_variants(tiny_bundle, "I think ", {"b": []}, seeds=[0], max_new_tokens=6, metrics=False)
    fresh = generate_variants(tiny_bundle, "I think ", {"b": []}, seeds=[0], max_new_tokens=6, metrics=False)
    assert base_again[0].token_ids == fresh[0].token_ids
