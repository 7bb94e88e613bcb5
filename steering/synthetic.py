"""Tiny random models and SAEs saved to disk, loaded through the real loaders.

Tests (and the Gemma-scale benchmark) never download: they build a random model of the same
architecture with transformers, random SAEs with sae-lens, save both to a folder with a
``preset.json``, and load that preset through `Bundle.load` like any other.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bundle import REF_SCALE_FILE
from .presets import SITES, Preset, SaeSource, hook_name, write_preset

_TEXT = (
    "I think the wedding was lovely and the bride smiled . The angry man shouted at the "
    "referee during the football match . God and religion matter to many people . "
    "The recipe needs flour , sugar , eggs and butter . def add ( a , b ) : return a + b . "
    "The theorem states that every prime number greater than two is odd . Once upon a time "
    "a little girl found a cat in the garden . Physics studies energy , matter and quantum fields ."
)


def tiny_tokenizer(out_dir: Path, vocab_size: int = 384):
    """A small byte-level BPE tokenizer trained on a built-in paragraph, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(out_dir)
    return fast


def tiny_model_config(arch: str, n_layers: int, d_model: int, vocab_size: int, **overrides):
    """A transformers config of the given architecture at toy (or given) sizes."""
    from transformers import Gemma2Config, LlamaConfig

    heads = overrides.pop("num_attention_heads", max(2, d_model // 32))
    common = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=overrides.pop("num_key_value_heads", 1),
                  intermediate_size=overrides.pop("intermediate_size", 2 * d_model),
                  max_position_embeddings=overrides.pop("max_position_embeddings", 512),
                  eos_token_id=0, pad_token_id=0, bos_token_id=0, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, **overrides)
    if arch == "gemma2":
        head_dim = overrides.pop("head_dim", d_model // heads)
        return Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                            sliding_window=overrides.pop("sliding_window", 64), **overrides)
    raise ValueError(f"unknown arch {arch!r}; valid: llama, gemma2")


def random_sae(d_in: int, d_sae: int, layer: int, site: str, k: int = 8, seed: int = 0,
               decoder: torch.Tensor | None = None):
    """A random TopK sae-lens SAE with unit-norm decoder rows (or the given decoder)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k,
                        metadata=SAEMetadata(hook_name=hook_name(layer, site)))
    sae = TopKSAE(cfg)
    W = decoder.clone().float() if decoder is not None else torch.randn(d_sae, d_in, generator=gen)
    W = W / W.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def save_sae(sae, folder: Path, ref_scale: torch.Tensor | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sae.save_model(folder)
    if ref_scale is not None:
        save_file({"ref_scale": ref_scale.float().contiguous()}, str(folder / REF_SCALE_FILE))
    return folder


def make_tiny_preset(out_dir: Path, arch: str = "llama", n_layers: int = 3, d_model: int = 64,
                     widths: dict | None = None, seed: int = 0, name: str | None = None,
                     decoders: dict | None = None, **model_overrides) -> Path:
    """Build and save a random model + random SAEs for every (layer, site); return the
    ``preset.json`` path. ``decoders[(layer, site)]`` overrides a decoder (hand-built cases)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    widths = widths or {"res": 2 * d_model, "mlp": d_model, "attn": d_model}
    torch.manual_seed(seed)
    tok = tiny_tokenizer(out_dir / "model")
    config = tiny_model_config(arch, n_layers, d_model, len(tok), **model_overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a larger init than the default 0.02 so activations are not tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    model.save_pretrained(out_dir / "model")
    gen = torch.Generator().manual_seed(seed)
    for layer in range(n_layers):
        for i, site in enumerate(SITES):
            dec = (decoders or {}).get((layer, site))
            w = dec.shape[0] if dec is not None else widths[site]
            sae = random_sae(d_model, w, layer, site, seed=seed * 1000 + layer * 3 + i, decoder=dec)
            save_sae(sae, out_dir / "saes" / site / f"layer_{layer}",
                     ref_scale=0.5 + torch.rand(w, generator=gen))
    preset = Preset(name=name or f"tiny-{arch}", description=f"random tiny {arch} model (tests)",
                    arch=arch, model=str((out_dir / "model").resolve()), n_layers=n_layers,
                    d_model=d_model, chat_template=True,
                    saes={s: SaeSource("local", path=f"saes/{s}/layer_{{layer}}") for s in SITES})
    return write_preset(preset, out_dir / "preset.json")


def gemma_scale_bundle(device: str | None = None, n_layers: int = 26, d_model: int = 2304,
                       width: int = 16384, vocab_size: int = 256000, sites: tuple[str, ...] = SITES,
                       seed: int = 0):
    """A Bundle with Gemma 2 2B's architecture and sizes (config written here, random weights)
    and random ``width``-wide TopK SAEs at every (layer, site): for benchmarks only.

    Built in memory on the target device (no download, no disk round trip). The tokenizer is
    the tiny test tokenizer: token ids are random anyway.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    from .bundle import Bundle, pick_device, pick_dtype

    dev = pick_device(device)
    dtype = pick_dtype(dev)
    torch.manual_seed(seed)
    cfg = tiny_model_config("gemma2", n_layers, d_model, vocab_size, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, intermediate_size=9216,
                            sliding_window=4096, max_position_embeddings=8192,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    cfg._attn_implementation = "eager"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(Path(tmp))
    saes = {}
    for layer in range(n_layers):
        for i, site in enumerate(sites):
            sae = random_sae(d_model, width, layer, site, k=64, seed=seed + layer * 3 + i)
            saes[(layer, site)] = sae.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    preset = Preset(name="gemma-2-2b-synthetic", description="random weights at Gemma 2 2B scale (benchmark)",
                    arch="gemma2", model="(random)", n_layers=n_layers, d_model=d_model,
                    saes={s: SaeSource("local", path=f"unused/{s}/{{layer}}") for s in sites})
    return Bundle(preset, model, tok, saes, dev, dtype, {k: None for k in saes})
