"""Issue 21: a steering plan exported as a llama.cpp control vector, read back with `gguf`."""

import json

import pytest
import torch

from steering import cli
from steering.export import layer_vectors, read_control_vector, write_control_vector


def _export(capsys, preset, *args) -> dict:
    rc = cli.main(["export", *args, "--preset", str(preset), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_export_writes_every_layer_of_the_plan_as_direction_n(tiny_llama_preset, tiny_bundle, tmp_path, capsys):
    from steering.settings import SteerSettings
    from steering.steer import _deltas, plan_run

    out = tmp_path / "cv.gguf"
    args = ["2/res/3", "--condition", "cumulative", "--strength", "2", "--alpha", "-0.1", "--t-res", "0.0",
            "--t-module", "0.0"]
    res = _export(capsys, tiny_llama_preset, *args, "--out", str(out))
    vecs, meta = read_control_vector(out)
    assert meta["layer_count"] == len(vecs) and sorted(vecs) == res["layers"]
    assert 0 not in vecs  # llama.cpp refuses direction.0

    # The same plan, applied by the playground's own hooks: per layer, the sum over sites of the
    # additive edits `steering.steer` makes must equal direction.N.
    settings = SteerSettings.create("2/res/3", condition="cumulative", layer=None, strength=2.0, schedule="exp",
                                    alpha=-0.1, s_end=1.0, r=0.0, task="activate", t_res=0.0, t_module=0.0)
    _, specs = plan_run(tiny_bundle, settings)
    deltas = _deltas(tiny_bundle, [specs])  # {(layer, site): [1, 1, d_model]}
    want: dict[int, torch.Tensor] = {}
    for (layer, _site), d in deltas.items():
        want[layer] = want.get(layer, torch.zeros(tiny_bundle.d_model)) + d[0, 0].float()
    assert sorted(k for k in want if k > 0) == sorted(vecs)
    for n, vec in vecs.items():
        assert vec.shape == (tiny_bundle.d_model,)
        assert torch.allclose(vec, want[n], atol=1e-5), n
    skipped = [f for f in res["skipped"]]
    assert all(f.startswith("0/") for f in skipped) and (0 in want) == bool(skipped)
    assert all("/attn/" in f for f in res["approximate"])


def test_export_refuses_removal_and_layer_zero_only(tiny_llama_preset, tiny_bundle, tmp_path, capsys):
    rc = cli.main(["export", "1/res/3", "--task", "remove", "--out", str(tmp_path / "x.gguf"),
                   "--preset", str(tiny_llama_preset)])
    assert rc == 2 and "not a constant vector" in capsys.readouterr().err
    rc = cli.main(["export", "0/res/3", "--condition", "seed-only", "--out", str(tmp_path / "y.gguf"),
                   "--preset", str(tiny_llama_preset)])
    assert rc == 2 and "layer 0" in capsys.readouterr().err
    assert not (tmp_path / "y.gguf").exists()


def test_write_refuses_direction_zero_and_round_trips(tmp_path):
    vecs = {1: torch.arange(8.0), 5: -torch.ones(8)}
    path = write_control_vector(tmp_path / "cv.gguf", vecs, "test-model")
    back, meta = read_control_vector(path)
    assert meta == {"model_hint": "test-model", "layer_count": 2}
    assert sorted(back) == [1, 5] and all(torch.equal(back[k], vecs[k]) for k in vecs)
    with pytest.raises(ValueError, match="layer 0"):
        write_control_vector(tmp_path / "bad.gguf", {0: torch.ones(8)}, "m")


def test_layer_vectors_refuses_rescale_specs(tiny_bundle):
    from steering.features import parse_feature
    from steering.steer import SteerSpec

    with pytest.raises(ValueError, match="removal"):
        layer_vectors(tiny_bundle, [SteerSpec(parse_feature("1/res/3"), 0.0, mode="rescale")])
