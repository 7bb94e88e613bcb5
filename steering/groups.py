"""Data-based checks of flow relations (paper §5.1-5.2, App. A; METHOD.md "Predecessor groups",
"Deactivation"), and live activations of a flow graph on a prompt.

- Predecessor groups: for a target feature active in R_l at a token, which of its top-1
  predecessors (R_{l-1}, M_l, A_l) are active at the same token: one of the 7 non-empty subsets of
  {RES, MLP, ATT}, or "From nowhere".
- Deactivation: rescale a predecessor at one token, h_t <- h_t + (r - 1) * a_t * W_dec[p], and read
  the target again in R_l. Cheap evaluation: an edit of M_l or A_l changes R_l at token t by
  exactly the same vector (R_l = R_{l-1} + A_l + M_l), so no forward pass is rerun; an edit of
  R_{l-1} reruns the model only up to block l (a hook stops the forward there).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from . import sites as S
from .features import FeatureId, parse_feature
from .flow import table
from .graph import FlowGraph

GROUPS = ("RES", "MLP", "ATT", "RES+MLP", "RES+ATT", "MLP+ATT", "RES+MLP+ATT", "From nowhere")
PRED_SITES = (("RES", "res", -1), ("MLP", "mlp", 0), ("ATT", "attn", 0))


def group_name(res: bool, mlp: bool, att: bool) -> str:
    parts = [n for n, on in (("RES", res), ("MLP", mlp), ("ATT", att)) if on]
    return "+".join(parts) if parts else "From nowhere"


@dataclass
class GroupRecord:
    """One (target feature, token) case: its group and predecessor scores s(R), s(M), s(A)."""

    layer: int
    feature: int
    text: int
    token: int
    group: str
    s_res: float | None
    s_mlp: float | None
    s_attn: float | None


def _all_keys(bundle) -> list[tuple[int, str]]:
    return sorted(bundle.saes)


@torch.no_grad()
def encode_all(bundle, text: str) -> tuple[dict, dict, torch.Tensor]:
    """One forward: site activations {(l, s): [seq, d]}, SAE codes {(l, s): [seq, w]}, input ids."""
    enc = bundle.tokenize([text])
    store, _ = bundle.activations(enc, _all_keys(bundle))
    acts = {k: v[0] for k, v in store.items()}
    codes = {k: bundle.encode(*k, v).cpu() for k, v in acts.items()}
    return acts, codes, enc["input_ids"]


def sample_tokens(n_tokens: int, k: int, rng: random.Random) -> list[int]:
    """k random positions, never position 0 (the attention sink / BOS)."""
    return sorted(rng.sample(range(1, n_tokens), min(k, n_tokens - 1)))


@torch.no_grad()
def predecessor_groups(bundle, texts: list[str], tokens_per_text: int = 5, seed: int = 0,
                       layers: list[int] | None = None) -> list[GroupRecord]:
    """Classify every active residual feature at sampled tokens into its predecessor group."""
    rng = random.Random(seed)
    layers = [l for l in (layers or bundle.layers) if (l, "res") in bundle.saes]
    out: list[GroupRecord] = []
    for ti, text in enumerate(texts):
        _, codes, ids = encode_all(bundle, text)
        toks = sample_tokens(ids.shape[1], tokens_per_text, rng)
        for l in layers:
            z = codes[(l, "res")]  # [seq, w]
            preds = {}
            for name, site, dl in PRED_SITES:
                src = (l + dl, site)
                if src in bundle.saes:
                    preds[name] = (table(bundle, (l, "res"), src), codes[src])
            for t in toks:
                active = (z[t] > 0).nonzero().flatten()
                flags, scores = {}, {}
                for name, (m, zp) in preds.items():
                    flags[name] = zp[t][m.index[active]] > 0  # [n_active]
                    scores[name] = m.cosine[active]
                for j, f in enumerate(active.tolist()):
                    on = {n: bool(flags[n][j]) if n in flags else False for n in ("RES", "MLP", "ATT")}
                    sc = {n: float(scores[n][j]) if n in scores else None for n in ("RES", "MLP", "ATT")}
                    out.append(GroupRecord(l, f, ti, t, group_name(on["RES"], on["MLP"], on["ATT"]),
                                           sc["RES"], sc["MLP"], sc["ATT"]))
    return out


def group_shares(records: list[GroupRecord]) -> dict[int, dict[str, float]]:
    """Per layer, the share of each group (sums to 1 per layer)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for r in records:
        counts[r.layer][r.group] += 1
    return {l: {g: c[g] / sum(c.values()) for g in GROUPS} for l, c in sorted(counts.items())}


# ---- deactivation ------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@dataclass
class Deactivation:
    """Result of rescaling predecessor(s) of a target at one token."""

    target: str
    predecessors: list[str]
    token: int
    r: float
    z_old: float
    z_new: float
    activation_change: float  # 1 - z_new / z_old
    deactivated: bool  # z_new <= 0
    loss_change: float | None = None  # relative change of the text's next-token loss


@torch.no_grad()
def deactivate(bundle, text: str, token: int, target: FeatureId | str, preds: list[FeatureId | str],
               r: float = 0.0, compute_loss: bool = False, cache: tuple | None = None) -> Deactivation:
    """Rescale ``preds`` (in R_{l-1}, M_l or A_l of the target's layer l) at ``token`` only, and
    read the target in R_l (paper §5.2). ``cache`` = encode_all(...) output to reuse."""
    tgt = parse_feature(target, bundle)
    if tgt.site != "res":
        raise ValueError(f"deactivation targets are residual features, got {tgt}")
    preds = [parse_feature(p, bundle) for p in preds]
    for p in preds:
        if (p.layer, p.site) not in ((tgt.layer - 1, "res"), (tgt.layer, "mlp"), (tgt.layer, "attn")):
            raise ValueError(f"{p} is not in R_{tgt.layer - 1}, M_{tgt.layer} or A_{tgt.layer} of target {tgt}")
    acts, codes, ids = cache or encode_all(bundle, text)
    if not 1 <= token < ids.shape[1]:
        raise ValueError(f"token {token} out of range; valid: 1..{ids.shape[1] - 1} (0 is the attention sink)")
    deltas: dict[tuple[int, str], torch.Tensor] = {}
    for p in preds:
        key = (p.layer, p.site)
        a = float(codes[key][token, p.index])
        d = (r - 1.0) * a * bundle.sae(*key).W_dec[p.index].float().cpu()  # [d_model]
        deltas[key] = deltas.get(key, torch.zeros_like(d)) + d
    h = acts[(tgt.layer, "res")][token].float().cpu()  # [d_model]
    z_old = float(codes[(tgt.layer, "res")][token, tgt.index])
    res_key = (tgt.layer - 1, "res")
    module_delta = sum((v for k, v in deltas.items() if k != res_key), torch.zeros_like(h))
    if res_key in deltas:
        h = _rerun_to_layer(bundle, ids, token, res_key, deltas[res_key], tgt.layer, module_delta)
    else:
        h = h + module_delta
    z_new = float(bundle.encode(tgt.layer, "res", h[None].to(bundle.device))[0, tgt.index])
    loss_change = _loss_change(bundle, ids, token, deltas) if compute_loss else None
    ac = 1.0 - z_new / z_old if z_old > 0 else 0.0
    return Deactivation(str(tgt), [str(p) for p in preds], token, r, z_old, z_new, ac, z_new <= 0, loss_change)


def _rerun_to_layer(bundle, ids, token, res_key, delta, layer, module_delta) -> torch.Tensor:
    """R_layer at ``token`` after adding ``delta`` to R_{layer-1} there (forward stopped at layer)."""
    store: dict = {}

    def edit(h):
        h = h.clone()
        h[:, token] += delta.to(h.device, h.dtype)
        return h

    def grab(_m, _i, out):
        store["h"] = S.hidden_of(out)[0, token].float().cpu()
        raise _Stop

    with bundle.lock, S.edit_sites({res_key: bundle.module(*res_key)}, {res_key: edit}):
        handle = bundle.module(layer, "res").register_forward_hook(grab)
        try:
            bundle.model.model(input_ids=ids[:, : token + 1].to(bundle.device))
        except _Stop:
            pass
        finally:
            handle.remove()
    return store["h"] + module_delta


def _loss_change(bundle, ids, token, deltas) -> float:
    """Relative change of the mean next-token loss over the text after the edit."""
    def loss(edits) -> float:
        with bundle.lock, S.edit_sites({k: bundle.module(*k) for k in edits}, edits):
            logits = bundle.model(input_ids=ids.to(bundle.device)).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device)))

    def make(delta):
        def edit(h):
            h = h.clone()
            h[:, token] += delta.to(h.device, h.dtype)
            return h
        return edit

    base = loss({})
    return (loss({k: make(v) for k, v in deltas.items()}) - base) / base


def predecessor_candidates(bundle, target: FeatureId, codes: dict, token: int, method: str = "top1_cosine",
                           seed: int = 0) -> list[FeatureId]:
    """Active predecessors of a target at a token chosen by a matching method (paper §5.2):
    top1_cosine / top5_cosine / random_top5 / permutation per predecessor site."""
    from .flow import match

    out = []
    for _, site, dl in PRED_SITES:
        src = (target.layer + dl, site)
        if src not in bundle.saes:
            continue
        if method in ("top1_cosine",):
            idx = [int(table(bundle, (target.layer, "res"), src).index[target.index])]
        else:
            m = match(bundle.decoder(target.layer, "res")[target.index:target.index + 1], bundle.decoder(*src),
                      method, seed) if method != "permutation" else table(bundle, (target.layer, "res"), src,
                                                                          "permutation")
            sel = m.index[target.index] if method == "permutation" else m.index[0]
            idx = sel.flatten().tolist()
        out += [FeatureId(src[0], site, i) for i in idx if codes[src][token, i] > 0]
    return out


# ---- live activations ----------------------------------------------------------------------------

@torch.no_grad()
def live_activations(bundle, graph: FlowGraph, prompt: str) -> dict:
    """Activation of every node of a flow graph at every token of ``prompt`` (one forward)."""
    from . import limits

    prompt = limits.clean_text("prompt", prompt, limits.MAX_PROMPT_CHARS)
    enc = bundle.tokenize([prompt])
    keys = sorted({(n.layer, n.site) for n in graph.nodes if not n.approx})
    store, _ = bundle.activations(enc, keys)
    tokens = bundle.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    acts = {}
    for k in keys:
        z = bundle.encode(*k, store[k][0]).cpu()  # [seq, w]
        for n in graph.nodes:
            if (n.layer, n.site) == k:
                acts[str(n.id)] = [round(float(v), 4) for v in z[:, n.id.index]]
    return {"tokens": [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in tokens], "acts": acts}
