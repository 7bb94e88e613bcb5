"""Attention-sink positions, found by residual norm rather than by index.

SmolLM2 prepends no BOS, so the first token becomes an attention sink whose residual stream norm
is ~100x that of other tokens; some starts (a repeated first token such as "00") make position 1
a sink too. Gemma's BOS behaves the same way. Statistics over SAE activations (training, reference
scales, catalog contexts, probes) must skip every sink, not only index 0 (paper App. A.1 samples
"non-BOS tokens" for the same reason).
"""

from __future__ import annotations

import torch

SINK_RATIO = 10.0  # a sink's residual norm is >= this many times the row's median norm
# What people read (the catalog's contexts, labels and stats; "Which features fire?") also skips
# massive-activation tokens between 5x and 10x the median norm. On the default model these are
# almost all " the" (92 of 99 such tokens in 8,001 catalog tokens, session 14), plus partial sinks
# at position 1 of a chunk (9.5x after "ups"): left in, one such position was the top context of
# 5.7% of the residual features at layers 12-19 and put "the" into hundreds of labels. Training,
# reference scales and the evaluation keep SINK_RATIO (the shipped SAEs were made with it).
DISPLAY_SINK_RATIO = 5.0


def sink_mask(resid: torch.Tensor, attention_mask: torch.Tensor | None = None,
              ratio: float = SINK_RATIO) -> torch.Tensor:
    """Boolean [batch, seq]: True at attention-sink positions.

    ``resid``: one residual-stream layer [batch, seq, d] (or several stacked, [layers, batch,
    seq, d]: a position is a sink if it is one at any of them). A position is a sink when its
    L2 norm exceeds ``ratio`` times the median norm of the row's real tokens. The first real
    token of every row is always a sink (it has nothing to attend to but itself).
    ``attention_mask`` [batch, seq] (1 = real token) excludes padding from the median; padded
    positions are never sinks.
    """
    if resid.dim() == 3:
        resid = resid[None]
    if resid.dim() != 4:
        raise ValueError(f"resid must be [batch, seq, d] or [layers, batch, seq, d], got {tuple(resid.shape)}")
    norms = resid.float().norm(dim=-1)  # [layers, batch, seq]
    real = (torch.ones_like(norms[0], dtype=torch.bool) if attention_mask is None
            else attention_mask.to(norms.device).bool())  # [batch, seq]
    med = norms.masked_fill(~real, float("nan")).nanmedian(dim=-1, keepdim=True).values  # [layers, batch, 1]
    mask = (norms > ratio * med).any(0) & real
    first = real.float().argmax(-1)  # [batch]
    mask[torch.arange(mask.shape[0]), first] = True
    return mask & real
