"""Do a preset's SAEs carry feature flow? Cross-layer alignment checks (issue 16).

    python -m steering.training.alignment --preset default --out assets/saes_v2/alignment.json

Every figure is computed per layer on held-out text (attention sinks skipped, `steering.sinks`)
and beside a chance level, because a cosine alone says little (paper §3.2 matching):

- **Decoder cosines** of the *active* residual features: s(R) = top-1 cosine with R_{l-1},
  s(M), s(A) = top-1 cosine with M_l, A_l (the predecessor scores of §3.3). Chance: the top-1
  cosine of random unit directions against the same number of random unit directions in the same
  dimension (its median and 99th percentile). Reported: share of s(R) >= t(R) = 0.5, medians, and
  the share of s(M), s(A) above the chance 99th percentile.
- **Flow span**: the kept span l_end - l_start + 1 of `steering.flow.build_flow_graph` at
  t(R) = 0.5 for a sample of active residual features per layer (what the app draws).
- **Data-based transfer check** in the spirit of the paper's App. F: encode R_{l-1} with its SAE,
  move every active code to its top-1 match in R_l (forward relation, magnitude kept), decode
  with R_l's SAE and report the FVE against R_l. It uses the data and the match tables only,
  not how the SAEs were initialised. Baselines: the same with each code moved to a random
  feature (chance), and R_{l-1} itself used as the prediction of R_l (how slowly the residual
  stream changes; a reference, not a bound).
- **FVE per domain** of every SAE (1 - SSE / total variance about the domain's mean).

The causal check (Table 1 success at r = 0) is `python -m steering.experiments deactivation`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from .. import sites as S
from ..bundle import Bundle
from ..flow import build_flow_graph, build_tables, chance_top1, table
from ..sinks import sink_mask
from . import corpus

log = logging.getLogger(__name__)
T_RES = 0.5  # paper App. B.2


def fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance explained of x [N, d] by x_hat [N, d] (about x's own mean)."""
    x, x_hat = x.double(), x_hat.double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def transfer_fve(codes_prev: torch.Tensor, dec_prev: torch.Tensor, dec_cur: torch.Tensor,
                 b_dec_cur: torch.Tensor, mapping: torch.Tensor, target: torch.Tensor) -> float:
    """App. F-style check. codes_prev [N, w_prev] (SAE codes of R_{l-1}); dec_prev [w_prev, d] and
    dec_cur [w_cur, d] raw decoder rows; mapping [w_prev] -> index in R_l; target R_l [N, d].
    Each code keeps its magnitude (code x decoder-row norm) and takes its match's unit direction."""
    mag = codes_prev * dec_prev.norm(dim=-1)  # [N, w_prev]
    moved = torch.zeros(codes_prev.shape[0], dec_cur.shape[0]).index_add_(1, mapping, mag)  # [N, w_cur]
    unit = dec_cur / dec_cur.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return fve(target, moved @ unit + b_dec_cur)


@torch.no_grad()
def capture(bundle: Bundle, texts: list[str], max_tokens: int, ctx: int = 128) -> dict:
    """Site activations at non-sink tokens of ``texts``: {(layer, site): [N, d]}, N <= max_tokens."""
    keys = sorted(bundle.saes)
    need = {(l, "res") for l in bundle.layers} | set(keys)
    mods = {k: bundle.module(*k) for k in need}
    out: dict = {k: [] for k in keys}
    n = 0
    for i in range(0, len(texts), 8):
        enc = bundle.tokenize(texts[i:i + 8], max_length=ctx)
        store: dict = {}
        with bundle.lock, S.capture_sites(mods, store):
            bundle.model.model(**enc)
        res = torch.stack([store[(l, "res")] for l in bundle.layers])
        keep = ~sink_mask(res, enc["attention_mask"]) & enc["attention_mask"].bool()
        for k in keys:
            out[k].append(store[k][keep].float().cpu())
        n += int(keep.sum())
        if n >= max_tokens:
            break
    return {k: torch.cat(v)[:max_tokens] for k, v in out.items()}


def domain_texts(domain: str, n: int = 200, seed: int = 1) -> list[str]:
    docs = corpus.sample_texts(domain, n, seed=seed, split="heldout", min_chars=200)
    return [d[:1000] for d in docs]


@torch.no_grad()
def report(bundle: Bundle, tokens_per_domain: int = 2048, span_seeds: int = 48, seed: int = 0,
           domains: tuple[str, ...] = corpus.DOMAINS) -> dict:
    """Every check of the module docstring; a JSON-ready dict."""
    rng = random.Random(seed)
    build_tables(bundle)
    L = list(bundle.layers)
    d = bundle.d_model
    acts = {}
    for dom in tqdm(domains, desc="capture"):
        try:
            acts[dom] = capture(bundle, domain_texts(dom), tokens_per_domain)
        except FileNotFoundError as e:
            log.warning("domain %s skipped: %s", dom, e)
    if not acts:
        raise FileNotFoundError(f"none of the domains {', '.join(domains)} is installed; "
                                "run scripts/install_corpora.sh")
    mixed = {k: torch.cat([a[k] for a in acts.values()]) for k in next(iter(acts.values()))}
    codes = {k: bundle.encode(*k, x.to(bundle.device)).cpu() for k, x in tqdm(mixed.items(), desc="encode")}

    tokens = {dom: int(a[(L[0], "res")].shape[0]) for dom, a in acts.items()}
    out: dict = {"preset": bundle.preset.name, "tokens": tokens, "t_res": T_RES, "layers": {}}
    chance = {}
    for l in L:
        row: dict = {}
        active = (codes[(l, "res")] > 0).any(0).nonzero().flatten()
        row["active_res"] = len(active)
        for name, key in (("s_res", (l - 1, "res")), ("s_mlp", (l, "mlp")), ("s_attn", (l, "attn"))):
            if key not in bundle.saes:
                continue
            cos = table(bundle, (l, "res"), key).cosine[active]
            w = bundle.width(*key)
            if w not in chance:
                c = chance_top1(w, d, seed=seed)
                chance[w] = (float(c.median()), float(c.quantile(0.99)))
            med, p99 = chance[w]
            row[name] = {"median": round(float(cos.median()), 4),
                         "share_ge_t_res": round(float((cos >= T_RES).float().mean()), 4),
                         "share_gt_chance_p99": round(float((cos > p99).float().mean()), 4),
                         "chance_median": round(med, 4), "chance_p99": round(p99, 4)}
        # flow span of sampled active features, as the app builds it
        sample = rng.sample(active.tolist(), min(span_seeds, len(active)))
        spans = []
        for f in sample:
            g = build_flow_graph(bundle, f"{l}/res/{f}", t_res=T_RES)
            spans.append(g.l_end - g.l_start + 1)
        row["span"] = {"median": statistics.median(spans) if spans else 0,
                       "mean": round(sum(spans) / max(1, len(spans)), 2), "n": len(spans)}
        # App. F-style transfer
        if (l - 1, "res") in bundle.saes:
            prev, cur = bundle.sae(l - 1, "res"), bundle.sae(l, "res")
            dec_prev, dec_cur = prev.W_dec.float().cpu(), cur.W_dec.float().cpu()
            b_cur = cur.b_dec.float().cpu()
            fwd = table(bundle, (l - 1, "res"), (l, "res")).index
            g = torch.Generator().manual_seed(seed * 1009 + l)
            rand_map = torch.randint(0, dec_cur.shape[0], fwd.shape, generator=g)
            target = mixed[(l, "res")]
            row["transfer_fve"] = round(transfer_fve(codes[(l - 1, "res")], dec_prev, dec_cur, b_cur, fwd, target), 4)
            row["transfer_fve_random_map"] = round(transfer_fve(codes[(l - 1, "res")], dec_prev, dec_cur, b_cur,
                                                                rand_map, target), 4)
            row["fve_prev_residual"] = round(fve(target, mixed[(l - 1, "res")]), 4)
        # FVE of every SAE per domain
        row["fve"] = {}
        for site in bundle.sites:
            if (l, site) not in bundle.saes:
                continue
            sae = bundle.sae(l, site)
            row["fve"][site] = {}
            for dom, a in acts.items():
                x = a[(l, site)]
                x_hat = sae.decode(bundle.encode(l, site, x.to(bundle.device)).to(sae.W_dec.dtype)).float().cpu()
                row["fve"][site][dom] = round(fve(x, x_hat), 4)
        out["layers"][l] = row
    out["summary"] = summarize(out)
    return out


def summarize(rep: dict) -> dict:
    rows = list(rep["layers"].values())

    def med(vals):
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 4) if vals else None

    s = {"share_s_res_ge_0.5": med([r["s_res"]["share_ge_t_res"] for r in rows if "s_res" in r]),
         "median_s_res": med([r["s_res"]["median"] for r in rows if "s_res" in r]),
         "median_span": med([r["span"]["median"] for r in rows]),
         "transfer_fve_median": med([r.get("transfer_fve") for r in rows]),
         "transfer_fve_random_map_median": med([r.get("transfer_fve_random_map") for r in rows]),
         "fve_prev_residual_median": med([r.get("fve_prev_residual") for r in rows])}
    for name in ("s_mlp", "s_attn"):
        s[f"{name}_share_gt_chance_p99_median"] = med([r[name]["share_gt_chance_p99"] for r in rows if name in r])
        s[f"{name}_median"] = med([r[name]["median"] for r in rows if name in r])
    sites = {site for r in rows for site in r["fve"]}
    doms = {dom for r in rows for f in r["fve"].values() for dom in f}
    s["fve_mean"] = {site: {dom: round(sum(r["fve"][site][dom] for r in rows if site in r["fve"]) /
                                     sum(1 for r in rows if site in r["fve"]), 4) for dom in sorted(doms)}
                     for site in sorted(sites)}
    return s


def markdown(rep: dict) -> str:
    lines = ["| layer | s(R) median | share s(R)>=0.5 | s(M) > chance p99 | s(A) > chance p99 | span median | "
             "transfer FVE | random map | R_{l-1} as R_l |", "|---|---|---|---|---|---|---|---|---|"]
    def g(r, name, field):
        return f"{r[name][field]:.2f}" if name in r else "-"

    def tf(r, k):
        return f"{r[k]:.2f}" if k in r else "-"

    for l, r in sorted(rep["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {l} | {g(r, 's_res', 'median')} | {g(r, 's_res', 'share_ge_t_res')} | "
                     f"{g(r, 's_mlp', 'share_gt_chance_p99')} | {g(r, 's_attn', 'share_gt_chance_p99')} | "
                     f"{r['span']['median']} | {tf(r, 'transfer_fve')} | {tf(r, 'transfer_fve_random_map')} | "
                     f"{tf(r, 'fve_prev_residual')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Cross-layer alignment checks of a preset's SAEs")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, required=True, help="JSON report (a .md table is written beside it)")
    p.add_argument("--tokens-per-domain", type=int, default=2048)
    p.add_argument("--span-seeds", type=int, default=48)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    bundle = Bundle.load(a.preset, device=a.device, progress=lambda it: tqdm(it, desc="loading SAEs"))
    rep = report(bundle, a.tokens_per_domain, a.span_seeds)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1))
    a.out.with_suffix(".md").write_text(markdown(rep) + "\n")
    log.info("summary: %s", json.dumps(rep["summary"]))


if __name__ == "__main__":
    main()
