"""Issue 21: big presets load through accelerate's device_map; SAEs and steering hooks follow
each layer's device. On the CPU the split is CPU RAM + disk offload (what a GPU machine does with
GPUs + CPU + disk); the steered texts must equal those of the plain load, bit for bit."""

import torch

from steering.bundle import Bundle, execution_device
from steering.features import parse_feature
from steering.generate import generate_variants
from steering.sites import decoder_layers
from steering.steer import SteerSpec


def test_offloaded_layers_steer_exactly_like_the_plain_load(tiny_llama_preset, tiny_bundle, tmp_path):
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    b = Bundle.load(str(tiny_llama_preset), device="cpu", device_map=dm, offload_folder=tmp_path / "offload")
    layers = decoder_layers(b.model)
    # layers 1 and 2 really are offloaded: their weights are not in memory, accelerate moves them in
    assert all(p.device.type == "meta" for layer in layers[1:] for p in layer.parameters())
    assert all(p.device.type == "cpu" for p in layers[0].parameters())
    assert all(execution_device(layer).type == "cpu" for layer in layers)
    assert all(next(sae.parameters()).device == b.layer_device(k[0]) for k, sae in b.saes.items())

    variants = {"plain": [], "add": [SteerSpec(parse_feature("1/res/3"), 4.0), SteerSpec(parse_feature("2/mlp/5"), 2.0)],
                "remove": [SteerSpec(parse_feature("2/res/3"), 0.0, mode="rescale")]}
    want = generate_variants(tiny_bundle, "the cat", variants, seeds=[0, 1], max_new_tokens=6)
    got = generate_variants(b, "the cat", variants, seeds=[0, 1], max_new_tokens=6)
    assert [g.text for g in got] == [g.text for g in want]
    assert len({g.text for g in want if g.variant == "add"} | {g.text for g in want if g.variant == "plain"}) > 1
    with torch.no_grad():
        ids = b.tokenizer("the cat sat", return_tensors="pt")["input_ids"]
        assert torch.allclose(b.model(ids).logits, tiny_bundle.model(ids).logits, atol=1e-5)


def test_max_memory_is_parsed_or_refused_by_name():
    import pytest

    from steering.bundle import parse_max_memory

    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory("") is None
    for bad in ("gpu0=1GiB", "0:20GiB", "cpu="):
        with pytest.raises(ValueError, match="max_memory"):
            parse_max_memory(bad)


def test_cli_loads_a_preset_with_a_device_map(tiny_llama_preset, tmp_path, capsys, monkeypatch):
    import json

    from steering import cli

    monkeypatch.setenv("FFP_CACHE", str(tmp_path))
    rc = cli.main(["info", "--preset", str(tiny_llama_preset), "--device-map", "auto", "--max-memory", "cpu=64GiB",
                   "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n_layers"] == 3
