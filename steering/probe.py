"""Which features fire for a text: the strongest SAE features per token and overall (the app's
"Which features fire?" and the demo sweep)."""

from __future__ import annotations

from typing import Iterable

import torch

from . import limits
from .catalog.words import token_pieces, token_strings
from .sinks import DISPLAY_SINK_RATIO, sink_mask


@torch.no_grad()
def features_for_text(bundle, text: str, k: int = 10, sites: Iterable[str] = ("res",), hide=None,
                      keep_sinks: bool = False) -> dict:
    """The features most active on a text.

    Returns ``{"tokens": [...], "per_token": [[(fid, act), ...] per token], "top": [(fid, max_act,
    token_index), ...]}``: per token its k strongest features over the chosen sites, and overall the
    k features with the largest activation anywhere (and where); ``"pieces"``: the text rebuilt
    from its tokens (`catalog.words.token_pieces`: no '\ufffd' where a character spans tokens),
    ``[(text, [token positions]), ...]``. Activations are in units of the
    feature's typical activation (value / reference scale, paper §5.3 units), so features of
    different layers compare. Attention sinks (position 0 and any by residual norm) are skipped,
    their lists empty, unless ``keep_sinks``. ``hide(layer, site)`` -> a bool per feature of that
    SAE (True: leave it out, e.g. `Catalog.function_features`); None keeps every feature.
    """
    text = limits.clean_text("text", text, limits.MAX_PROMPT_CHARS)
    limits.check_int("k", k, 1, 100)
    sites = tuple(sites)
    keys = [key for key in sorted(bundle.saes) if key[1] in sites]
    if not keys:
        raise ValueError(f"no SAEs for sites {sites}; the bundle has {', '.join(bundle.sites)}")
    enc = bundle.tokenize([text])
    n_tok = enc["input_ids"].shape[1]
    if n_tok > limits.MAX_PROMPT_TOKENS:
        raise ValueError(f"text is too long ({n_tok} tokens); allowed: at most {limits.MAX_PROMPT_TOKENS}")
    res_keys = [(l, "res") for l in bundle.layers if (l, "res") in bundle.saes]
    store, _ = bundle.activations(enc, list(dict.fromkeys(keys + res_keys)))
    # Ranked by activation / the feature's typical activation (its reference scale): raw values grow
    # with depth and would rank late-layer features first whatever the text is about.
    z = torch.cat([bundle.encode(*key, store[key][0]).cpu() / bundle.ref_scale(*key).clamp_min(1e-6)
                   for key in keys], dim=-1)  # [seq, sum of widths]
    if hide is not None:
        hidden = [torch.as_tensor(hide(*key) or [False] * bundle.width(*key), dtype=torch.bool) for key in keys]
        z[:, torch.cat(hidden)] = 0
    if not keep_sinks:
        sinks = (sink_mask(torch.stack([store[k][0] for k in res_keys])[:, None], ratio=DISPLAY_SINK_RATIO)[0].cpu()
                 if res_keys else None)
        z[0] = 0  # attention sink
        if sinks is not None:
            z[sinks] = 0  # and any other sink (by residual norm)
    names = [f"{l}/{s}/" for l, s in keys for _ in range(bundle.width(l, s))]
    offsets = [i for key in keys for i in range(bundle.width(*key))]
    ids = enc["input_ids"][0].tolist()
    strings = token_strings(bundle.tokenizer, ids)
    a, j = z.topk(min(k, z.shape[1]), dim=-1)  # [seq, k]
    per_token = [[(names[f] + str(offsets[f]), round(v, 4)) for v, f in zip(ar, jr) if v > 0]
                 for ar, jr in zip(a.tolist(), j.tolist())]
    m, where = z.max(dim=0)  # [sum of widths]
    mv, mj = m.topk(min(k, len(m)))
    top = [(names[f] + str(offsets[f]), round(v, 4), int(where[f])) for v, f in zip(mv.tolist(), mj.tolist()) if v > 0]
    return {"tokens": [strings[i] for i in ids], "per_token": per_token, "top": top,
            "pieces": token_pieces(bundle.tokenizer, ids)}

