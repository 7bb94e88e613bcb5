"""Where each site lives in a Hugging Face model, and hooks to read or edit it.

Paper §3.3: per block l, R_l = R_{l-1} + A_l + M_l.
- Llama-style: R_l = output of ``layers[l]``; A_l = first output of ``layers[l].self_attn``;
  M_l = output of ``layers[l].mlp``.
- Gemma 2: A_l = output of ``post_attention_layernorm`` (this norm follows attention in Gemma 2;
  in Llama the same name is the pre-MLP norm!), M_l = output of ``post_feedforward_layernorm``.

Every hook here works on the module's output whether it is a tensor (transformers 5 decoder
layers) or a tuple (attention modules); `with_hidden` rebuilds the same structure.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .presets import check_site

Edit = Callable[[torch.Tensor], torch.Tensor]  # [batch, seq, d_model] -> same


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers; only Llama/Gemma-2-style "
                        "decoder models are supported")
    return layers


def site_module(model: nn.Module, arch: str, layer: int, site: str) -> nn.Module:
    """The module whose output is the site's activation (paper §3.3)."""
    check_site(site)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range; valid layers: 0..{len(layers) - 1}")
    block = layers[layer]
    if site == "res":
        return block
    if arch == "llama":
        return block.self_attn if site == "attn" else block.mlp
    if arch == "gemma2":
        return block.post_attention_layernorm if site == "attn" else block.post_feedforward_layernorm
    raise ValueError(f"unknown arch {arch!r}; valid: llama, gemma2")


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor in a module output (tensor, or first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its hidden-state tensor replaced by `hidden`."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def edit_sites(modules: dict[object, nn.Module], edits: dict[object, Edit]) -> Iterator[None]:
    """Apply ``edits[key]`` to the output of ``modules[key]`` while inside the block.

    Hooks are registered in a ``try`` and always removed in ``finally``, also on errors,
    so no edit outlives its request.
    """
    handles = []
    try:
        for key, fn in edits.items():
            def hook(_mod, _inp, out, fn=fn):
                return with_hidden(out, fn(hidden_of(out)))
            handles.append(modules[key].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_sites(modules: dict[object, nn.Module], store: dict, detach: bool = True,
                  transform: Callable[[object, torch.Tensor], torch.Tensor] | None = None
                  ) -> Iterator[dict]:
    """Record each module's hidden output into ``store[key]`` (optionally transformed)."""
    handles = []
    try:
        for key, mod in modules.items():
            def hook(_mod, _inp, out, key=key):
                h = hidden_of(out)
                h = h.detach() if detach else h
                store[key] = transform(key, h) if transform else h
            handles.append(mod.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in the model (leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
