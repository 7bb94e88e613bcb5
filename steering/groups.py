"""Data-based checks of flow relations (paper §5.1 predecessor groups, §5.2 deactivation, App. A),
and live activations of a flow graph on a prompt.

- Predecessor groups (§5.1, App. A.1): for a target feature active in R_l at a token, which of
  its top-1 predecessors (R_{l-1}, M_l, A_l) are active at the same token: one of the 7 non-empty
  subsets of {RES, MLP, ATT}, or "From nowhere". One forward per text captures every site; the
  rest is SAE encoding and lookups into the cached match tables (`flow.table`).
- Deactivation (§5.2, App. A.2): rescale predecessor(s) p at token t only,
  h_t <- h_t + (r - 1) * a_t * W_dec[p] (raw decoder row of p's SAE, a_t its activation there),
  and read the target again in R_l. Cheap evaluation (paper §3.3): R_l = R_{l-1} + A_l + M_l and
  M_l is its last term, so an edit of M_l changes R_l at t by exactly the same vector and nothing
  is rerun. An edit of A_l is NOT additive (the MLP of block l reads R_{l-1} + A_l, so M_l moves
  too; tests/test_groups.py checks this against a full forward); A_l and R_{l-1} edits rerun the
  model at token t only, reusing the keys/values of tokens < t from a KV cache (a batch of edits
  at once) and stopping after block l. The loss change (optional) reruns tokens t.. to the end
  with the same cache.
- Live activations: every node of a flow graph at every token of a prompt, one forward.

SAEs at approximate sites (``bundle.is_approx``: hook_z attention SAEs) do not read the site's
activation, so they are left out of these data-based analyses (their site counts as absent).
"""

from __future__ import annotations

import copy
import logging
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch

from . import sites as S
from .features import FeatureId, parse_feature
from .flow import table
from .graph import FlowGraph
from .settings import check_choice

log = logging.getLogger(__name__)
Key = tuple[int, str]
GROUPS = ("RES", "MLP", "ATT", "RES+MLP", "RES+ATT", "MLP+ATT", "RES+MLP+ATT", "From nowhere")
SINGLE_GROUPS = ("RES", "MLP", "ATT")
PRED_SITES = (("RES", "res", -1), ("MLP", "mlp", 0), ("ATT", "attn", 0))  # name, site, layer offset
DEACTIVATION_METHODS = ("top1_cosine", "top5_cosine", "random_top5", "permutation", "top1_pearson", "exhaustive")
RERUN_BATCH = 64


def group_name(res: bool, mlp: bool, att: bool) -> str:
    parts = [n for n, on in (("RES", res), ("MLP", mlp), ("ATT", att)) if on]
    return "+".join(parts) if parts else "From nowhere"


def chance_shares(p_active: dict[str, float]) -> dict[str, float]:
    """Each group's share when the top-1 matches are random features: a predecessor site's match is
    active at the token with probability ``p_active[name]`` ({"RES": .., "MLP": .., "ATT": ..}; a
    site left out, e.g. RES at layer 0, is never active), independently of the others. Under TopK
    p = k / width. -> {group: share}, summing to 1 (the chance row beside the §5.1 shares)."""
    out = {}
    for res in (True, False):
        for mlp in (True, False):
            for att in (True, False):
                share = 1.0
                for name, on in (("RES", res), ("MLP", mlp), ("ATT", att)):
                    p = p_active.get(name, 0.0)
                    share *= p if on else 1.0 - p
                out[group_name(res, mlp, att)] = share
    return {g: out[g] for g in GROUPS}


def pred_keys(bundle, layer: int) -> dict[str, Key]:
    """Predecessor sites of R_layer that have (non-approximate) SAEs: {"RES": (l-1, "res"), ...}."""
    out = {}
    for name, site, dl in PRED_SITES:
        key = (layer + dl, site)
        if key in bundle.saes and not bundle.is_approx(site):
            out[name] = key
    return out


# ---- one forward per text -------------------------------------------------------------------

class TextCache(NamedTuple):
    """Everything the analyses read from one forward of one text.

    ids [1, seq] (on the model's device); acts {(l, s): [seq, d_model]} and codes
    {(l, s): [seq, d_sae]} float32 on CPU; token_loss [seq - 1] next-token cross-entropy of the
    unedited text; prefix: KV caches of tokens < t per token t, filled lazily."""

    ids: torch.Tensor
    acts: dict
    codes: dict
    token_loss: torch.Tensor
    prefix: dict


@torch.no_grad()
def encode_all(bundle, text: str, max_length: int | None = 256) -> TextCache:
    """One forward of ``text`` capturing every site with a non-approximate SAE, then SAE codes."""
    keys = [k for k in sorted(bundle.saes) if not bundle.is_approx(k[1])]
    enc = bundle.tokenize([text], max_length=max_length)
    ids = enc["input_ids"]
    if ids.shape[1] < 2:
        raise ValueError(f"text {text[:40]!r} has {ids.shape[1]} token(s); need at least 2 (position 0 is skipped)")
    store, logits = bundle.activations(enc, keys)
    acts = {k: v[0].float().cpu() for k, v in store.items()}  # [seq, d_model]
    codes = {k: bundle.encode(*k, store[k][0]).cpu() for k in keys}  # [seq, d_sae]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none").cpu()
    return TextCache(ids, acts, codes, loss, {})


def sample_tokens(n_tokens: int, k: int, rng: random.Random) -> list[int]:
    """k random positions, never position 0 (the attention sink / BOS, `steering.sinks`)."""
    return sorted(rng.sample(range(1, n_tokens), min(k, n_tokens - 1)))


# ---- predecessor groups ---------------------------------------------------------------------

@dataclass
class GroupRecord:
    """One (target feature, token) case: its group and predecessor scores s(R), s(M), s(A)
    (None where the site has no SAE)."""

    layer: int
    feature: int
    text: int
    token: int
    group: str
    s_res: float | None
    s_mlp: float | None
    s_attn: float | None


@torch.no_grad()
def predecessor_groups(bundle, texts: list[str], tokens_per_text: int = 5, seed: int = 0,
                       layers: Iterable[int] | None = None, method: str = "top1_cosine",
                       max_length: int | None = 256, progress: Callable | None = None) -> list[GroupRecord]:
    """Classify every active residual feature at sampled tokens into its predecessor group
    (paper §5.1, App. A.1): ``tokens_per_text`` seeded non-zero positions per text, every active
    feature of R_l at every layer (default all). ``method`` picks the match tables (top-1 cosine
    by default)."""
    from .flow import GRAPH_METHODS

    check_choice("group matching method", method, GRAPH_METHODS)
    rng = random.Random(seed)
    layers = [l for l in (bundle.layers if layers is None else layers) if (l, "res") in bundle.saes]
    out: list[GroupRecord] = []
    for ti, text in enumerate(progress(texts) if progress else texts):
        tc = encode_all(bundle, text, max_length)
        toks = torch.tensor(sample_tokens(tc.ids.shape[1], tokens_per_text, rng))
        for l in layers:
            z = tc.codes[(l, "res")][toks]  # [n_tok, w]
            t_idx, f_idx = (z > 0).nonzero(as_tuple=True)  # active (token, feature) cases
            on, sc = {}, {}
            for name, key in pred_keys(bundle, l).items():
                m = table(bundle, (l, "res"), key, method)
                pred = m.index[f_idx]  # [n_cases]
                on[name] = (tc.codes[key][toks[t_idx], pred] > 0).tolist()
                sc[name] = m.cosine[f_idx].tolist()
            for j in range(len(f_idx)):
                flags = [on[n][j] if n in on else False for n in ("RES", "MLP", "ATT")]
                scores = [sc[n][j] if n in sc else None for n in ("RES", "MLP", "ATT")]
                out.append(GroupRecord(l, int(f_idx[j]), ti, int(toks[t_idx[j]]), group_name(*flags), *scores))
    return out


def group_shares(records: list[GroupRecord]) -> dict[int, dict[str, float]]:
    """Per layer, the share of each group (sums to 1 per layer)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in records:
        counts[r.layer][r.group] += 1
    return {l: {g: c[g] / sum(c.values()) for g in GROUPS} for l, c in sorted(counts.items())}


def group_scores(records: list[GroupRecord]) -> dict[str, dict[str, list[float]]]:
    """Per group, the predecessor scores of its cases, ``{group: {"s_res": [...], "s_mlp": [...],
    "s_attn": [...]}}`` (missing scores left out): the samples a Mann-Whitney test compares (§5.1)."""
    out: dict[str, dict[str, list[float]]] = {g: {"s_res": [], "s_mlp": [], "s_attn": []} for g in GROUPS}
    for r in records:
        for name in ("s_res", "s_mlp", "s_attn"):
            if getattr(r, name) is not None:
                out[r.group][name].append(getattr(r, name))
    return out


# ---- deactivation: cheap evaluation ---------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer we read has run."""


def _base_model(bundle):
    return getattr(bundle.model, "model", bundle.model)


def _prefix(bundle, tc: TextCache, token: int):
    """KV cache of tokens 0..token-1 (all layers), computed once per (text, token)."""
    if token not in tc.prefix:
        with bundle.lock:
            out = _base_model(bundle)(input_ids=tc.ids[:, :token], use_cache=True)
        tc.prefix[token] = out.cache
    return tc.prefix[token]


def _add_at(deltas: torch.Tensor, pos: int):
    """Edit adding deltas [B, d_model] to position ``pos`` of every row."""
    def edit(h):  # [B, seq, d_model]
        h = h.clone()
        h[:, pos] += deltas.to(h.device, h.dtype)
        return h
    return edit


def _fork(rows: int):
    """Forward pre-hook repeating a batch-1 hidden state ``rows`` times: every block before it runs
    once, the rows (one per edit) differ from this block on."""
    def hook(_m, args, kwargs):
        if args:
            return (args[0].expand(rows, *args[0].shape[1:]).contiguous(), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].expand(rows, *kwargs["hidden_states"].shape[1:]).contiguous()
        return args, kwargs
    return hook


@torch.no_grad()
def forked_forward(bundle, tc: TextCache, token: int, deltas: dict[Key, torch.Tensor], stop_layer: int | None = None
                   ) -> torch.Tensor:
    """Rerun tokens ``token``.. (up to ``token`` itself when ``stop_layer`` is set) with the keys
    and values of earlier tokens from the prefix KV cache, adding row b of ``deltas[(l, site)]``
    [B, d_model] to that site's output at ``token`` in row b.

    The batch forks into B rows at the first block holding an edited site (blocks before it run
    once). Returns R_stop_layer at ``token`` [B, d_model] (float32, CPU; the forward stops after
    that block), or, with stop_layer None, the logits [B, n - token, vocab]."""
    keys = list(deltas)
    rows = next(iter(deltas.values())).shape[0]
    fork_at = min(l for l, _ in keys)
    cache = copy.deepcopy(_prefix(bundle, tc, token))  # before any hook is live
    for layer_cache in cache.layers[fork_at:]:
        layer_cache.batch_repeat_interleave(rows)
    ids = tc.ids[:, token:token + 1] if stop_layer is not None else tc.ids[:, token:]
    store: dict = {}

    def grab(_m, _i, o):
        store["h"] = S.hidden_of(o)[:, 0].float().cpu()  # [B, d_model]
        raise _Stop

    handles = []
    with bundle.lock, S.edit_sites({k: bundle.module(*k) for k in keys}, {k: _add_at(d, 0) for k, d in deltas.items()}):
        try:
            handles.append(S.decoder_layers(bundle.model)[fork_at].register_forward_pre_hook(
                _fork(rows), with_kwargs=True))
            if stop_layer is not None:
                handles.append(bundle.module(stop_layer, "res").register_forward_hook(grab))
                _base_model(bundle)(input_ids=ids, cache=cache, use_cache=True)
            else:
                return bundle.model(input_ids=ids, cache=cache, use_cache=True).logits
        except _Stop:
            return store["h"]
        finally:
            for h in handles:
                h.remove()
    raise RuntimeError(f"the forward never reached block {stop_layer}")


def rerun_residual(bundle, tc: TextCache, token: int, layer: int, deltas: dict[Key, torch.Tensor]) -> torch.Tensor:
    """R_layer at ``token`` after adding row b of ``deltas[(l, site)]`` [B, d_model] to that site's
    output at ``token``, for each row b (edits at R_{layer-1}, A_layer or M_layer): only token
    ``token`` is rerun, in batches of RERUN_BATCH rows.  # [B, d_model]"""
    n = next(iter(deltas.values())).shape[0]
    return torch.cat([forked_forward(bundle, tc, token, {k: d[i:i + RERUN_BATCH] for k, d in deltas.items()}, layer)
                      for i in range(0, n, RERUN_BATCH)])


def rescale_delta(bundle, fid: FeatureId, tc: TextCache, token: int, r: float) -> torch.Tensor:
    """(r - 1) * a_t * W_dec[f] for feature f at ``token`` (paper §5.2).  # [d_model]"""
    a = float(tc.codes[(fid.layer, fid.site)][token, fid.index])
    return (r - 1.0) * a * bundle.sae(fid.layer, fid.site).W_dec[fid.index].detach().float().cpu()


EditSet = tuple[FeatureId, ...]


@torch.no_grad()
def codes_after(bundle, tc: TextCache, token: int, layer: int, edit_sets: list[EditSet], r: float = 0.0
                ) -> torch.Tensor:
    """SAE codes of R_layer at ``token`` after rescaling each set of predecessors (in R_{l-1},
    M_l or A_l) by r there, one row per set (cheap evaluation, module docstring).  # [n_sets, d_sae]

    Sets that only touch M_l add their delta to R_l (exact: M_l is the last term of R_l); sets
    touching R_{l-1} or A_l (which the MLP of block l reads) are rerun at that token only."""
    allowed = ((layer - 1, "res"), (layer, "attn"), (layer, "mlp"))
    d_model = tc.acts[(layer, "res")].shape[-1]
    parts = {k: torch.zeros(len(edit_sets), d_model) for k in allowed}  # per-site deltas, [n_sets, d_model]
    for i, es in enumerate(edit_sets):
        for f in es:
            if (f.layer, f.site) not in allowed:
                raise ValueError(f"{f} is not in R_{layer - 1}, M_{layer} or A_{layer} of the target layer {layer}")
            parts[(f.layer, f.site)][i] += rescale_delta(bundle, f, tc, token, r)
    h = tc.acts[(layer, "res")][token].expand(len(edit_sets), d_model).clone()  # [n_sets, d_model]
    rerun = [i for i, es in enumerate(edit_sets) if any(f.site != "mlp" for f in es)]
    only_mlp = [i for i in range(len(edit_sets)) if i not in set(rerun)]
    h[only_mlp] += parts[(layer, "mlp")][only_mlp]
    if rerun:
        used = {k: v[rerun] for k, v in parts.items() if any(f.layer == k[0] and f.site == k[1]
                                                              for i in rerun for f in edit_sets[i])}
        h[rerun] = rerun_residual(bundle, tc, token, layer, used)
    return bundle.encode(layer, "res", h.to(bundle.device)).cpu()


@torch.no_grad()
def loss_change_after(bundle, tc: TextCache, token: int, edit_sets: list[EditSet], r: float = 0.0
                      ) -> list[float | None]:
    """Relative change of the mean next-token loss over positions token.. (the ones an edit at
    ``token`` can affect) for each edit set, rerunning tokens token.. with the prefix KV cache.
    None when ``token`` is the last position (nothing after it is predicted)."""
    n = tc.ids.shape[1]
    if token >= n - 1 or not edit_sets:
        return [None] * len(edit_sets)
    base = float(tc.token_loss[token:].mean())
    keys = sorted({(f.layer, f.site) for es in edit_sets for f in es})
    out: list[float | None] = []
    for i in range(0, len(edit_sets), RERUN_BATCH):
        chunk = edit_sets[i:i + RERUN_BATCH]
        deltas = {k: torch.zeros(len(chunk), tc.acts[k].shape[-1]) for k in keys}
        for j, es in enumerate(chunk):
            for f in es:
                deltas[(f.layer, f.site)][j] += rescale_delta(bundle, f, tc, token, r)
        logits = forked_forward(bundle, tc, token, deltas)[:, :-1].float()  # [B, n - token - 1, vocab]
        ids = tc.ids[:, token:].expand(len(chunk), n - token)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out += [(float(v) - base) / base for v in loss.mean(dim=1).cpu()]
    return out


# ---- deactivation: one case and the protocol ------------------------------------------------

@dataclass
class Deactivation:
    """Rescaling predecessor(s) of a target feature at one token (paper §5.2).

    activation_change = 1 - z_new / z_old. deactivated: z_new <= 0, i.e. the target is no longer
    active in R_l at that token (for TopK SAEs: it left the top k or its pre-activation is <= 0);
    the paper's success rate counts these. loss_change: relative change of the mean next-token
    loss over positions token.. (None unless asked for, or at the last token)."""

    target: str
    predecessors: list[str]
    token: int
    r: float
    z_old: float
    z_new: float
    activation_change: float
    deactivated: bool
    loss_change: float | None = None
    text: int = 0
    group: str = ""
    method: str = ""


def _check_target(bundle, target, preds) -> tuple[FeatureId, list[FeatureId]]:
    tgt = parse_feature(target, bundle)
    if tgt.site != "res":
        raise ValueError(f"deactivation targets are residual features (layer/res/index), got {tgt}")
    preds = [parse_feature(p, bundle) for p in preds]
    allowed = ((tgt.layer - 1, "res"), (tgt.layer, "mlp"), (tgt.layer, "attn"))
    for p in preds:
        if (p.layer, p.site) not in allowed:
            raise ValueError(f"{p} is not in R_{tgt.layer - 1}, M_{tgt.layer} or A_{tgt.layer} of target {tgt}")
        if bundle.is_approx(p.site):
            raise ValueError(f"{p}: {p.site} SAEs are approximate ({bundle.is_approx(p.site)}); cannot rescale them")
    return tgt, preds


@torch.no_grad()
def deactivate(bundle, text: str, token: int, target: FeatureId | str, preds: list[FeatureId | str],
               r: float = 0.0, compute_loss: bool = False, cache: TextCache | None = None) -> Deactivation:
    """Rescale ``preds`` (in R_{l-1}, M_l or A_l of the target's layer l) by ``r`` at ``token`` only
    and read the target in R_l (paper §5.2, cheap evaluation). ``cache``: `encode_all` of the text."""
    tgt, preds = _check_target(bundle, target, preds)
    tc = cache or encode_all(bundle, text)
    if not 1 <= token < tc.ids.shape[1]:
        raise ValueError(f"token {token} out of range; valid: 1..{tc.ids.shape[1] - 1} (0 is the attention sink)")
    z_old = float(tc.codes[(tgt.layer, "res")][token, tgt.index])
    z_new = float(codes_after(bundle, tc, token, tgt.layer, [tuple(preds)], r)[0, tgt.index])
    loss = loss_change_after(bundle, tc, token, [tuple(preds)], r)[0] if compute_loss else None
    ac = 1.0 - z_new / z_old if z_old > 0 else 0.0
    return Deactivation(str(tgt), [str(p) for p in preds], token, r, z_old, z_new, ac, z_new <= 0, loss)


def candidates(bundle, tc: TextCache, token: int, target: FeatureId, method: str = "top1_cosine") -> EditSet:
    """The active predecessors a matching method picks for ``target`` at ``token`` (paper §5.2):
    per predecessor site (R_{l-1}, M_l, A_l), the method's match if it is active there;
    ``top5_cosine`` takes every active feature among the top 5. (``exhaustive`` is not a fixed
    set: see `deactivation_check`.)"""
    if method not in DEACTIVATION_METHODS or method == "exhaustive":
        raise ValueError(f"unknown candidate method {method!r}; valid: {', '.join(DEACTIVATION_METHODS[:-1])}")
    out: list[FeatureId] = []
    for key in pred_keys(bundle, target.layer).values():
        idx = table(bundle, (target.layer, "res"), key, method).index[target.index]
        out += [FeatureId(*key, i) for i in idx.flatten().tolist() if tc.codes[key][token, i] > 0]
    return tuple(out)


class MethodSummary(NamedTuple):
    """Aggregate of one method over the cases (paper Table 1).

    n_cases: targets considered; n_with_predecessor: cases where the method found an active
    predecessor (the success-rate denominator); activation_change: mean over those;
    success_rate: deactivated / n_with_predecessor; loss_change: mean relative loss change (None
    when not computed)."""

    method: str
    n_cases: int
    n_with_predecessor: int
    activation_change: float
    success_rate: float
    loss_change: float | None


@dataclass
class DeactivationReport:
    cases: list[Deactivation]
    summary: dict[str, MethodSummary]
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"settings": self.settings, "summary": {m: s._asdict() for m, s in self.summary.items()},
                "cases": [asdict(c) for c in self.cases]}


def summarize(cases: list[Deactivation], n_cases: dict[str, int]) -> dict[str, MethodSummary]:
    out = {}
    for method, n in n_cases.items():
        cs = [c for c in cases if c.method == method]
        losses = [c.loss_change for c in cs if c.loss_change is not None]
        out[method] = MethodSummary(
            method, n, len(cs), sum(c.activation_change for c in cs) / len(cs) if cs else float("nan"),
            sum(c.deactivated for c in cs) / len(cs) if cs else float("nan"),
            sum(losses) / len(losses) if losses else None)
    return out


@torch.no_grad()
def deactivation_check(bundle, texts: list[str], layers: Iterable[int] = (6, 12, 18), tokens_per_text: int = 5,
                       max_targets: int = 25, methods: Iterable[str] = ("top1_cosine",), r: float = 0.0,
                       seed: int = 0, single_only: bool = True, compute_loss: bool = False,
                       max_length: int | None = 256, progress: Callable | None = None) -> DeactivationReport:
    """The deactivation protocol (paper §5.2, App. A.2, Table 1).

    Per text: ``tokens_per_text`` seeded non-zero tokens; per layer and token, up to ``max_targets``
    active features of R_l (seeded sample), skipping "From nowhere" targets (groups by top-1
    cosine) and, with ``single_only`` (Table 1), keeping only single-predecessor groups. Each
    method rescales its `candidates` by ``r``; ``exhaustive`` tries every active feature of
    R_{l-1}, M_l and A_l alone and keeps the one that lowers the target most (the best single
    predecessor). All edits at one (text, layer, token) are evaluated in one batch.
    """
    methods = list(methods)
    for m in methods:
        if m not in DEACTIVATION_METHODS:
            raise ValueError(f"unknown deactivation method {m!r}; valid: {', '.join(DEACTIVATION_METHODS)}")
    layers = list(layers)
    for l in layers:
        if (l, "res") not in bundle.saes:
            raise ValueError(f"no residual SAE at layer {l}; layers: {list(bundle.layers)}")
    rng = random.Random(seed)
    cases: list[Deactivation] = []
    n_cases = dict.fromkeys(methods, 0)
    for ti, text in enumerate(progress(texts) if progress else texts):
        tc = encode_all(bundle, text, max_length)
        for t in sample_tokens(tc.ids.shape[1], tokens_per_text, rng):
            for l in layers:
                cases += _deactivate_at(bundle, tc, ti, t, l, methods, r, max_targets, single_only,
                                        compute_loss, rng, n_cases)
    settings = {"layers": layers, "tokens_per_text": tokens_per_text, "max_targets": max_targets, "r": r,
                "seed": seed, "single_only": single_only, "n_texts": len(texts), "methods": methods}
    return DeactivationReport(cases, summarize(cases, n_cases), settings)


def _deactivate_at(bundle, tc, ti, t, l, methods, r, max_targets, single_only, compute_loss, rng, n_cases):
    preds = pred_keys(bundle, l)
    active = (tc.codes[(l, "res")][t] > 0).nonzero().flatten().tolist()
    targets = []
    for f in rng.sample(active, len(active)):
        fid = FeatureId(l, "res", f)
        top1 = {n: int(table(bundle, (l, "res"), k).index[f]) for n, k in preds.items()}
        group = group_name(*[n in top1 and bool(tc.codes[preds[n]][t, top1[n]] > 0) for n in ("RES", "MLP", "ATT")])
        if group == "From nowhere" or (single_only and group not in SINGLE_GROUPS):
            continue
        targets.append((fid, group))
        if len(targets) == max_targets:
            break
    if not targets:
        return []
    singles = [(FeatureId(*k, i),) for k in preds.values() for i in (tc.codes[k][t] > 0).nonzero().flatten().tolist()]
    chosen: dict[tuple[FeatureId, str], EditSet] = {}
    for fid, _ in targets:
        for m in methods:
            if m != "exhaustive":
                chosen[(fid, m)] = candidates(bundle, tc, t, fid, m)
    sets = list(dict.fromkeys([*singles, *(s for s in chosen.values() if s)]))
    row = {s: i for i, s in enumerate(sets)}
    z = codes_after(bundle, tc, t, l, sets, r)  # [n_sets, d_sae]
    if "exhaustive" in methods:
        single_rows = torch.tensor([row[s] for s in singles], dtype=torch.long)
        for fid, _ in targets:
            if singles:
                chosen[(fid, "exhaustive")] = singles[int(z[single_rows, fid.index].argmin())]
            else:
                chosen[(fid, "exhaustive")] = ()
    loss = {}
    if compute_loss:
        todo = list(dict.fromkeys(s for s in chosen.values() if s))
        loss = dict(zip(todo, loss_change_after(bundle, tc, t, todo, r)))
    out = []
    for fid, group in targets:
        z_old = float(tc.codes[(l, "res")][t, fid.index])
        for m in methods:
            n_cases[m] += 1
            es = chosen[(fid, m)]
            if not es:
                continue
            z_new = float(z[row[es], fid.index])
            out.append(Deactivation(str(fid), [str(p) for p in es], t, r, z_old, z_new, 1.0 - z_new / z_old,
                                    z_new <= 0, loss.get(es), ti, group, m))
    return out


# ---- live activations -----------------------------------------------------------------------

@torch.no_grad()
def live_activations(bundle, graph: FlowGraph, prompt: str) -> dict:
    """Activation of every node of a flow graph at every token of ``prompt``: one forward under
    the model lock. Returns ``{"tokens": [...], "acts": {node_id: [per-token activation]},
    "skipped": [node ids at approximate sites, which cannot be read from the model's site]}``."""
    from . import limits

    prompt = limits.clean_text("prompt", prompt, limits.MAX_PROMPT_CHARS)
    enc = bundle.tokenize([prompt])
    keys = sorted({(n.layer, n.site) for n in graph.nodes if not bundle.is_approx(n.site)})
    store, _ = bundle.activations(enc, keys)
    ids = enc["input_ids"][0].tolist()
    acts = {}
    for k in keys:
        z = bundle.encode(*k, store[k][0]).cpu()  # [seq, d_sae]
        for n in graph.nodes:
            if (n.layer, n.site) == k:
                acts[str(n.id)] = [round(float(v), 4) for v in z[:, n.id.index]]
    return {"tokens": [bundle.tokenizer.decode([i]) for i in ids], "acts": acts,
            "skipped": [str(n.id) for n in graph.nodes if bundle.is_approx(n.site)]}
