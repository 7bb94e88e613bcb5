"""Steering with SAE features (paper §5.3, App. B; METHOD.md "Steering").

- Activation: h_t <- h_t + s * c_f * d_f on every token, d_f the unit decoder direction and c_f
  the feature's reference scale (``bundle.ref_scale``: the paper folds the JumpReLU threshold
  into the direction, so s is a multiple of the feature's typical activation; ``units="raw"``
  uses c_f = 1).
- Theme removal: h_t <- h_t + (r - 1) * a_t * W_dec[f] with a_t the SAE activation of f read at
  every step, r in {0, -1, ..., -64} (§5.2, App. B.1); the attention-sink position 0 is skipped.
- Conditions: ``baseline`` (the initial feature only), ``single`` (flow-graph features at layer
  l), ``cumulative`` (flow-graph features at layers l_start..l, MLP/attention nodes included),
  with exponential / linear / constant coefficient schedules across layers.

Hook design: hooks are registered per request inside `steering(...)` and removed in ``finally``
(also on errors), under ``bundle.lock``. One batch carries baseline and all variants: every row
has its own precomputed delta [batch, 1, d_model] per site, so the hook is one broadcast add with
no Python work per token, no absolute position indexing (decode steps see one new token), and no
shape-dependent branching except the removal mask of position 0 in the prefill call. Such
hooks are compatible with static KV caches; ``torch.compile`` recompiles around Python hooks, so
persistent buffers would be the next step if compile ever pays off on the target hardware.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from . import limits
from .features import FeatureId, parse_feature
from .graph import FlowGraph
from .sites import edit_sites

CONDITIONS = ("baseline", "single", "cumulative")
SCHEDULES = ("exp", "linear", "constant")
MODES = ("add", "rescale")


@dataclass(frozen=True)
class SteerSpec:
    """Steer one feature at its own site on every token.

    Fields:
        feature: the feature (layer/site/index).
        strength: s for ``add`` (multiples of c_f in folded units), r for ``rescale``.
        mode: ``add`` (activation) or ``rescale`` (theme removal, r=0 removes the feature).
        units: ``folded`` (s * c_f * d_f) or ``raw`` (s * d_f).
    """

    feature: FeatureId
    strength: float
    mode: Literal["add", "rescale"] = "add"
    units: Literal["folded", "raw"] = "folded"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.units not in ("folded", "raw"):
            raise ValueError(f"unknown units {self.units!r}; valid: folded, raw")
        limits.check_number("strength", self.strength, limits.MAX_ABS_STRENGTH)


def schedule_strength(layer: int, schedule: str, s: float, alpha: float = -0.05, l_start: int = 0,
                      l_end: int = 0, s_end: float = 1.0) -> float:
    """Coefficient at ``layer`` (absolute index) for a schedule (paper App. B.2):
    exp: s * e^(alpha * l); linear: from (l_start, s) to (l_end, s_end); constant: s."""
    if schedule == "exp":
        return s * math.exp(alpha * layer)
    if schedule == "linear":
        if l_end == l_start:
            return s
        return s + (s_end - s) * (layer - l_start) / (l_end - l_start)
    if schedule == "constant":
        return s
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def plan(graph: FlowGraph, condition: str = "cumulative", layer: int | None = None, strength: float = 3.0,
         schedule: str = "exp", alpha: float = -0.25, s_end: float = 1.0, mode: str = "add",
         sites: tuple[str, ...] = ("res", "mlp", "attn"), include: list[str] | None = None,
         exclude: list[str] | None = None, units: str = "folded") -> list[SteerSpec]:
    """The steering specs of a condition (paper §5.3).

    baseline: the graph's seed only, at ``strength``. single: graph nodes at ``layer`` (default:
    the seed's layer). cumulative: graph nodes at layers l_start..layer, coefficients from the
    schedule (l = absolute layer index). ``include`` adds node ids (e.g. out-of-span nodes) and
    ``exclude`` removes node ids, as the paper hand-picked nodes. ``mode='rescale'`` uses
    ``strength`` as r for every node (no schedule).
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(CONDITIONS)}")
    limits.check_number("strength", strength, limits.MAX_ABS_STRENGTH)
    limits.check_number("alpha", alpha, limits.MAX_ABS_ALPHA)
    limits.check_number("s_end", s_end, limits.MAX_ABS_STRENGTH)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    layer = graph.seed.layer if layer is None else layer
    layers = sorted({n.layer for n in graph.nodes})
    if condition != "baseline" and not graph.l_start <= layer <= graph.l_end:
        raise ValueError(f"layer {layer} is outside the flow graph's span; valid: {graph.l_start}..{graph.l_end}")
    if condition == "baseline":
        chosen = [graph.seed]
    else:
        lo = layer if condition == "single" else graph.l_start
        chosen = [n.id for n in graph.nodes if lo <= n.layer <= layer and n.in_span and n.site in sites]
    extra = [parse_feature(x) for x in include or []]
    known = {n.id for n in graph.nodes}
    for f in extra:
        if f not in known:
            raise ValueError(f"cannot include {f}: not a node of the flow graph of {graph.seed}")
    drop = {parse_feature(x) for x in exclude or []}
    chosen = [f for f in dict.fromkeys([*chosen, *extra]) if f not in drop]
    if not chosen:
        raise ValueError("no feature left to steer: every node was excluded or outside the span "
                         f"(layers {layers[0]}..{layers[-1]})")
    specs = []
    for f in chosen:
        if mode == "rescale":
            s = strength
        elif condition == "cumulative":
            s = schedule_strength(f.layer, schedule, strength, alpha, graph.l_start, layer, s_end)
        else:
            s = strength
        specs.append(SteerSpec(f, float(s), mode, units))
    return specs


def schedule_table(specs: list[SteerSpec]) -> list[dict]:
    """Per-layer, per-feature coefficients, for previews and run records."""
    return [{"layer": s.feature.layer, "feature": str(s.feature), "site": s.feature.site,
             "strength": round(s.strength, 6), "mode": s.mode}
            for s in sorted(specs, key=lambda s: (s.feature.layer, s.feature.site, s.feature.index))]


# ---- hooks -----------------------------------------------------------------------------------

def _deltas(bundle, rows: list[list[SteerSpec]]) -> dict[tuple[int, str], torch.Tensor]:
    """Additive edits per site: {(layer, site): [batch, 1, d_model]} from the ``add`` specs."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i, specs in enumerate(rows):
        for s in specs:
            if s.mode != "add":
                continue
            f = parse_feature(s.feature, bundle)
            key = (f.layer, f.site)
            if bundle.is_approx(f.site):
                raise ValueError(f"cannot steer {f}: {f.site} SAEs of this preset are approximate "
                                 "(matching only)")
            if key not in out:
                out[key] = torch.zeros(len(rows), 1, bundle.d_model)
            c = float(bundle.ref_scale(*key)[f.index]) if s.units == "folded" else 1.0
            out[key][i, 0] += s.strength * c * bundle.decoder(*key)[f.index]
    return {k: v.to(bundle.device, bundle.dtype) for k, v in out.items()}


def _rescales(bundle, rows: list[list[SteerSpec]]) -> dict[tuple[int, str], torch.Tensor]:
    """Removal factors per site: {(layer, site): [batch, d_sae]} holding r - 1 (0 = untouched)."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i, specs in enumerate(rows):
        for s in specs:
            if s.mode != "rescale":
                continue
            f = parse_feature(s.feature, bundle)
            key = (f.layer, f.site)
            if key not in out:
                out[key] = torch.zeros(len(rows), bundle.width(*key))
            out[key][i, f.index] = s.strength - 1.0
    return {k: v.to(bundle.device) for k, v in out.items()}


def _edit_fn(bundle, key, delta: torch.Tensor | None, factor: torch.Tensor | None, first_real: torch.Tensor):
    sae = bundle.sae(*key)

    def edit(h: torch.Tensor) -> torch.Tensor:  # [batch, seq, d_model]
        if delta is not None:
            h = h + delta
        if factor is not None:
            z = sae.encode(h.to(sae.W_dec.dtype)).float()  # [batch, seq, d_sae]
            change = (z * factor[:, None, :]) @ sae.W_dec.float()  # [batch, seq, d_model]
            if h.shape[1] > 1:  # prefill: skip each row's first real token (attention sink)
                pos = torch.arange(h.shape[1], device=h.device)[None, :]
                change = change * (pos != first_real[:, None])[..., None]
            h = h + change.to(h.dtype)
        return h

    return edit


@contextmanager
def steering(bundle, rows: list[list[SteerSpec]], attention_mask: torch.Tensor | None = None) -> Iterator[None]:
    """Apply per-row steering while inside the block (hooks removed in ``finally``).

    ``rows[i]`` are the specs of batch row i (empty list: unsteered). ``attention_mask``
    [batch, seq] locates each row's first real token under left padding.
    """
    deltas, factors = _deltas(bundle, rows), _rescales(bundle, rows)
    if attention_mask is None:
        first_real = torch.zeros(len(rows), dtype=torch.long, device=bundle.device)
    else:
        first_real = attention_mask.long().argmax(dim=1).to(bundle.device)
    keys = sorted(set(deltas) | set(factors))
    edits = {k: _edit_fn(bundle, k, deltas.get(k), factors.get(k), first_real) for k in keys}
    with bundle.lock, edit_sites({k: bundle.module(*k) for k in keys}, edits):
        yield
