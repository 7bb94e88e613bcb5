"""Steering with SAE features (paper §5.2-5.3, App. B).

- Activation: h_t <- h_t + s * c_f * d_f on every token (prompt and generated), d_f the unit
  decoder direction and c_f the feature's reference scale (``bundle.ref_scale``: the paper folds
  the JumpReLU threshold into the direction, so s is a multiple of the feature's typical
  activation; ``units="raw"`` uses c_f = 1).
- Theme removal (§5.2, App. B.1): h_t <- h_t + (r - 1) * a_t * W_dec[f], a_t the SAE encoder
  activation of f at token t read at every forward step, r in {0, -1, ..., -64}. W_dec[f] is
  the SAE's own decoder row (= d_f for unit-norm decoders), so r = 0 removes exactly the
  feature's share of the reconstruction.
- Neither edit touches an attention sink (each row's first real token, and in the prompt any
  position whose residual norm marks it as a sink, `steering.sinks`): the sink carries no
  content, and editing it changes the sample for no reason the user can see.
- Conditions: ``seed-only`` (the seed feature alone), ``single`` (flow-graph features at layer
  l), ``cumulative`` (flow-graph features at layers l_start..l, MLP/attention nodes included),
  with exponential / linear / constant coefficient schedules across layers (`plan`,
  `schedule_table` to preview them).

Hook design (why): hooks are registered per request inside `steering(...)` and removed in
``finally`` (also when generation raises), while holding ``bundle.lock``, so one request's
steering can never leak into another or a later one: there is no state left to reset. One
batch carries the unsteered rows and every variant: each row has its own precomputed delta
``[batch, 1, d_model]`` per site, so the add hook is one broadcast add with no Python work
per token (a KV-cache decode step sees one new token). To skip the sinks, a model pre-hook
reads the cache length of each
forward call (positions = past + arange(seq)) and each row's first real token comes from the
prompt's attention mask (left padding), so no position is ever assumed absolute in the chunk.
Per-request hooks work unchanged with a static KV cache; for ``torch.compile`` the same edit
functions can later move into persistent hooks reading per-request buffers (the deltas and
factors built here), reset in ``finally``.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from . import limits
from .features import FeatureId, parse_feature
from .graph import FlowGraph, FlowNode
from .presets import SITES, check_site
from .settings import (ALPHA, EDIT_MODES, S_END, SCHEDULES, SCOPES, STRENGTH, check_choice,
                       check_condition, check_strength)
from .sinks import sink_mask
from .sites import edit_sites, hidden_of

UNITS = ("folded", "raw")
_CACHE_KWARGS = ("cache", "past_key_values")


@dataclass(frozen=True)
class SteerSpec:
    """Steer one feature at its own site on every token.

    A batch row gets a list of specs (several features, several sites: a whole flow graph or
    several themes); per-row strengths come from giving each row its own list.

    Fields:
        feature: the feature (layer/site/index).
        strength: s for ``add`` (multiples of c_f in folded units), r for ``rescale``.
        mode: the edit mode, ``add`` (activation) or ``rescale`` (theme removal, r=0 removes the feature).
        units: ``folded`` (s * c_f * d_f) or ``raw`` (s * d_f); ignored by ``rescale``.
        direction_seed: ``add`` only: add a seeded random rotation of d_f instead of d_f, with
            the same norm (the random control, `steering.controls`; see `direction`).
    """

    feature: FeatureId
    strength: float
    mode: Literal["add", "rescale"] = "add"
    units: Literal["folded", "raw"] = "folded"
    direction_seed: int | None = None

    def __post_init__(self) -> None:
        check_choice("edit mode", self.mode, EDIT_MODES)
        check_choice("units", self.units, UNITS)
        if self.direction_seed is not None and self.mode != "add":
            raise ValueError("direction_seed (random direction) applies to add mode only")
        check_strength(self.strength, self.mode)


def schedule_strength(layer: int, schedule: str, s: float, alpha: float = ALPHA, l_start: int = 0,
                      l_end: int = 0, s_end: float = S_END) -> float:
    """Coefficient at ``layer`` (absolute index) for a schedule (paper App. B.2):
    exp: s * e^(alpha * l); linear: from (l_start, s) to (l_end, s_end); constant: s."""
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "exp":
        return s * math.exp(alpha * layer)
    if schedule == "linear" and l_end != l_start:
        return s + (s_end - s) * (layer - l_start) / (l_end - l_start)
    return s


def plan(graph: FlowGraph, condition: str = "cumulative", layer: int | None = None, strength: float = STRENGTH,
         schedule: str = "exp", alpha: float = ALPHA, s_end: float = S_END, mode: str = "add",
         sites: tuple[str, ...] = SITES, include: list[str] | None = None,
         exclude: list[str] | None = None, units: str = "folded") -> list[SteerSpec]:
    """The steering specs of a condition (paper §5.3). Pure: no model needed, for previews.

    seed-only: the graph's seed only, at ``strength``. single: graph nodes at ``layer`` (default:
    the seed's layer), constant ``strength``: we do not apply e^(alpha*l) there (App. C.3 quotes an
    alpha for single-layer runs too, but at one layer it only rescales s, so the strength the user
    sets is the strength applied). cumulative: graph nodes at layers l_start..layer, coefficients
    from the schedule (l = absolute layer index; linear runs from (l_start, s) to (l_end, s_end)
    of the whole graph, App. B.2, even when ``layer`` < l_end). ``sites`` restricts
    single/cumulative to those sites. ``include`` adds node ids (e.g. nodes cut from the span)
    and ``exclude`` removes node ids, as the paper hand-picked nodes. ``mode`` is the edit mode:
    ``'rescale'`` uses ``strength`` as r for every node (no schedule). The old condition name
    ``baseline`` (= ``seed-only``) is accepted with a deprecation warning.
    """
    condition = check_condition(condition)
    check_choice("edit mode", mode, EDIT_MODES)
    check_strength(strength, mode)
    limits.check_number("alpha", alpha, limits.MAX_ABS_ALPHA)
    limits.check_number("s_end", s_end, limits.MAX_ABS_STRENGTH)
    check_choice("schedule", schedule, SCHEDULES)
    for site in sites:
        check_site(site)
    layer = graph.seed.layer if layer is None else layer
    if condition != "seed-only" and not graph.l_start <= layer <= graph.l_end:
        raise ValueError(f"layer {layer} is outside the flow graph's span; valid: {graph.l_start}..{graph.l_end}")
    if condition == "seed-only":
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
        raise ValueError(f"no feature left to steer: every node of layers {graph.l_start}..{layer} "
                         f"at sites {', '.join(sites)} was excluded")
    specs = []
    for f in chosen:
        s = strength
        if mode == "add" and condition == "cumulative":
            # linear runs from (l_start, s) to (l_end, s*) of the WHOLE graph (paper App. B.2), also
            # when cumulative steering stops at layer < l_end
            s = schedule_strength(f.layer, schedule, strength, alpha, graph.l_start, graph.l_end, s_end)
        specs.append(SteerSpec(f, float(s), mode, units))
    return specs


def plan_run(bundle, settings, graph_of=None) -> tuple[list[FlowGraph], list[SteerSpec]]:
    """The flow graphs of a run's seed feature(s) (`settings.SteerSettings`) and the union of their
    plans (a node shared by two graphs is steered once): what ``steer`` applies and ``export``
    writes out. The seed-only condition needs no flow graph (a one-node graph stands in).
    ``graph_of(feature, t_res, t_module)`` builds a graph (default: `flow.build_flow_graph`; the app
    passes its own, which adds catalog labels)."""
    from .flow import build_flow_graph  # lazy: the flow engine is only needed here

    if graph_of is None:
        def graph_of(f, t_res, t_module):
            return build_flow_graph(bundle, f, t_res=t_res, t_module=t_module)

    graphs = []
    for f in settings.features:
        if settings.condition == "seed-only":
            seed = parse_feature(f, bundle)
            graphs.append(FlowGraph(seed, [FlowNode(seed, 1.0, "seed")], [], seed.layer, seed.layer))
        else:
            graphs.append(graph_of(f, settings.t_res, settings.t_module))
    if len(graphs) > 1 and settings.include:  # a seed set: each graph includes the nodes it has
        missing = [x for x in settings.include
                   if not any(parse_feature(x) in {n.id for n in g.nodes} for g in graphs)]
        if missing:
            raise ValueError(f"cannot include {missing[0]}: not a node of the flow graphs of "
                             f"{', '.join(str(g.seed) for g in graphs)}")
    specs, seen = [], set()
    for graph in graphs:
        run = settings
        if len(graphs) > 1 and settings.include:
            have = {n.id for n in graph.nodes}
            run = dataclasses.replace(settings, include=tuple(x for x in settings.include if parse_feature(x) in have))
        for s in plan_settings(graph, run):
            if s.feature not in seen:
                seen.add(s.feature)
                specs.append(s)
    return graphs, specs


def plan_settings(graph: FlowGraph, settings, condition: str | None = None) -> list[SteerSpec]:
    """`plan` with a run's settings (``condition`` overrides the settings' one, e.g. the app's
    third column)."""
    return plan(graph, condition or settings.condition, settings.layer, settings.edit_strength, settings.schedule,
                settings.alpha, settings.s_end, mode=settings.edit_mode, exclude=list(settings.exclude),
                include=list(settings.include))


def schedule_table(specs: list[SteerSpec], bundle=None) -> list[dict]:
    """Per-layer, per-feature coefficients (s'(l) for ``add``, r for ``rescale``), for previews
    and run records. With a bundle, ``add`` rows also show c_f (``scale``), the norm s'*c_f
    actually added (paper §5.3 units: show users both) and that norm as a percentage of the
    median residual-stream norm at the layer (``pct_of_residual``, `Bundle.residual_norms`)."""
    rows = []
    for s in sorted(specs, key=lambda s: (s.feature.layer, SITES.index(s.feature.site), s.feature.index)):
        row = {"layer": s.feature.layer, "feature": str(s.feature), "site": s.feature.site,
               "strength": round(s.strength, 6), "mode": s.mode}
        if s.direction_seed is not None:
            row["direction"] = f"random (seed {s.direction_seed})"
        if bundle is not None and s.mode == "add":
            f = s.feature
            c = float(bundle.ref_scale(f.layer, f.site)[f.index]) if s.units == "folded" else 1.0
            added = abs(s.strength) * c * float(bundle.decoder(f.layer, f.site)[f.index].norm())
            row.update(scale=round(c, 6), norm=round(s.strength * c, 6),
                       pct_of_residual=round(100 * added / max(bundle.residual_norms()[f.layer], 1e-6), 2))
        rows.append(row)
    return rows


# ---- hooks -----------------------------------------------------------------------------------

def _check_steerable(bundle, f: FeatureId) -> FeatureId:
    f = parse_feature(f, bundle)
    if bundle.is_approx(f.site):
        raise ValueError(f"cannot steer {f}: {f.site} SAEs of this preset are approximate (matching only)")
    return f


def _specs_by_site(bundle, rows: list[list[SteerSpec]], mode: str):
    """(row, (layer, site), feature, spec) for every spec of ``mode``, features checked."""
    for i, specs in enumerate(rows):
        for s in specs:
            if s.mode == mode:
                f = _check_steerable(bundle, s.feature)
                yield i, (f.layer, f.site), f, s


def _deltas(bundle, rows: list[list[SteerSpec]]) -> dict[tuple[int, str], torch.Tensor]:
    """Additive edits per site: {(layer, site): [batch, 1, d_model]} from the ``add`` specs."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i, key, f, s in _specs_by_site(bundle, rows, "add"):
        if key not in out:
            out[key] = torch.zeros(len(rows), 1, bundle.d_model)  # [batch, 1, d_model]
        c = float(bundle.ref_scale(*key)[f.index]) if s.units == "folded" else 1.0
        out[key][i, 0] += s.strength * c * direction(bundle, f, s.direction_seed)
    return {k: v.to(bundle.device, bundle.dtype) for k, v in out.items()}


def direction(bundle, f: FeatureId, seed: int | None = None) -> torch.Tensor:
    """Unit direction added for f: its decoder direction d_f, or (random control) Q @ d_f for a
    seeded random rotation Q of the residual space.  # [d_model]

    One rotation for every spec of a run keeps each norm and every cosine between the run's
    directions (a flow chain's aligned directions stay aligned, so they add up as strongly as the
    real ones) while the directions themselves are random."""
    d_f = bundle.decoder(f.layer, f.site)[f.index]
    if seed is None:
        return d_f

    def rotation() -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(bundle.d_model, bundle.d_model, generator=g))
        return q * torch.sign(torch.diagonal(r))  # Haar-random orthogonal  # [d, d]

    return bundle.cached(("rotation", seed), rotation) @ d_f


def _rescales(bundle, rows: list[list[SteerSpec]]) -> dict[tuple[int, str], torch.Tensor]:
    """Removal factors per site: {(layer, site): [batch, d_sae]} holding r - 1 (0 = untouched)."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i, key, f, s in _specs_by_site(bundle, rows, "rescale"):
        if key not in out:
            out[key] = torch.zeros(len(rows), bundle.width(*key))  # [batch, d_sae]
        out[key][i, f.index] = s.strength - 1.0
    return {k: v.to(bundle.device) for k, v in out.items()}


def _edit_fn(bundle, key, delta: torch.Tensor | None, factor: torch.Tensor | None, first_real: torch.Tensor,
             state: dict):
    sae = bundle.sae(*key)

    def edit(h: torch.Tensor) -> torch.Tensor:  # [batch, seq, d_model]
        pos = state["past"] + torch.arange(h.shape[1], device=h.device)  # [seq] absolute positions
        keep = pos[None, :] != first_real.to(h.device)[:, None]  # [batch, seq]: never edit an attention sink
        if state["past"] == 0 and state["sinks"].shape[1] == h.shape[1]:  # prefill: sinks found so far
            keep = keep & ~state["sinks"].to(h.device)  # (a device_map may put layers on other devices)
        if state["scope"] != "all":
            n_prompt = state["prompt_len"] if state["prompt_len"] is not None else h.shape[1]
            in_prompt = (pos < n_prompt)[None, :]  # [1, seq]
            keep = keep & (in_prompt if state["scope"] == "prompt" else ~in_prompt)
        if delta is not None:
            h = h + delta.to(h.device, h.dtype) * keep[..., None].to(h.dtype)  # [batch, 1, d_model], sinks left alone
        if factor is not None:
            # paper §5.2 / App. B.1: h_t += (r - 1) * a_t * W_dec[f], a_t read now by the encoder
            w = sae.W_dec
            z = sae.encode(h.to(w.device, w.dtype)).float()  # [batch, seq, d_sae]
            change = (z * factor.to(w.device)[:, None, :]) @ w.float()  # [batch, seq, d_model]
            h = h + (change.to(h.device) * keep[..., None]).to(h.dtype)
        return h

    return edit


def _sink_detector(state: dict):
    """Forward hook on every residual site: at prefill, mark positions whose residual norm makes
    them attention sinks (`steering.sinks`), so later edits skip them."""

    def hook(_mod, _inp, out):
        pm = state["prompt_mask"]
        h = hidden_of(out)
        if state["past"] == 0 and pm is not None and h.shape[1] == pm.shape[1]:
            state["sinks"] |= sink_mask(h, pm.to(h.device)).to(state["sinks"].device)

    return hook


def _past_length(state: dict):
    """Model pre-hook: record how many positions the KV cache already holds for this call."""

    def hook(_mod, _args, kwargs):
        # transformers 5 passes the KV cache as ``cache`` (``past_key_values`` is deprecated)
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        state["past"] = int(cache.get_seq_length()) if cache is not None else 0

    return hook


@contextmanager
def steering(bundle, rows: list[list[SteerSpec]], attention_mask: torch.Tensor | None = None,
             scope: str = "all") -> Iterator[None]:
    """Apply per-row steering to every forward pass inside the block; hooks are removed in
    ``finally`` (also on errors) and ``bundle.lock`` is held throughout.

    ``rows[i]`` are the specs of batch row i (empty list: unsteered). ``attention_mask``
    [batch, seq] of the prompt locates each row's first real token under left padding
    (default: position 0 of every row). ``scope`` (`SCOPES`): which positions are edited:
    ``all`` (prompt and generated tokens, the default and the paper's setting, App. B),
    ``prompt`` (the prompt's positions only: generation then reads a steered context) or
    ``generated`` (the positions of generated tokens only: the first new token is still
    predicted from the unsteered prompt). Attention sinks are never edited, in any scope.
    """
    check_choice("scope", scope, SCOPES)
    deltas, factors = _deltas(bundle, rows), _rescales(bundle, rows)
    if attention_mask is None:
        first_real = torch.zeros(len(rows), dtype=torch.long, device=bundle.device)
    else:
        if attention_mask.shape[0] != len(rows):
            raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows but {len(rows)} spec rows were given")
        first_real = attention_mask.long().argmax(dim=1).to(bundle.device)  # [batch]
    state = {"past": 0, "scope": scope, "prompt_len": attention_mask.shape[1] if attention_mask is not None else None,
             "prompt_mask": attention_mask.to(bundle.device) if attention_mask is not None else None,
             "sinks": torch.zeros(len(rows), 0, dtype=torch.bool, device=bundle.device)}
    if attention_mask is not None:
        state["sinks"] = torch.zeros(attention_mask.shape, dtype=torch.bool, device=bundle.device)
    keys = sorted(set(deltas) | set(factors))
    edits = {k: _edit_fn(bundle, k, deltas.get(k), factors.get(k), first_real, state) for k in keys}
    with bundle.lock:
        handles = []
        try:
            handles.append(bundle.model.register_forward_pre_hook(_past_length(state), with_kwargs=True))
            if attention_mask is not None and keys:  # registered before the edits: they see raw residuals
                for l in range(bundle.n_layers):
                    handles.append(bundle.module(l, "res").register_forward_hook(_sink_detector(state)))
            with edit_sites({k: bundle.module(*k) for k in keys}, edits):
                yield
        finally:
            for h in handles:
                h.remove()
