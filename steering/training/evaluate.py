"""Quality report for a preset's SAEs on held-out text (issue 4).

    python -m steering.training.evaluate --preset default --out assets/saes_v2/report.json

Per SAE (every position except attention sinks: position 0 and any found by residual norm,
`steering.sinks`):
- fve: fraction of variance explained, 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, where the
  mean is taken over the evaluated tokens of that site.
- l0: mean number of active features per token.
- dead: share of features that never fire on the evaluated tokens (``dead_tokens`` tokens).
- ce_clean / ce_spliced / ce_increase: next-token cross-entropy (nats) of the model with the
  site's output replaced by the SAE reconstruction at every position but 0, minus the clean
  model's, on ``ce_tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from .. import sites as S
from ..bundle import Bundle
from ..sinks import sink_mask
from . import corpus

log = logging.getLogger(__name__)


def heldout_batches(tokenizer, n_seqs: int, ctx: int = 128, seed: int = 1) -> torch.Tensor:
    """[n_seqs, ctx] token ids from held-out documents of the four domains, interleaved."""
    rows: list[torch.Tensor] = []
    domains = corpus.available()
    per = -(-n_seqs // len(domains))
    for domain in domains:
        ids: list[int] = []
        for doc in corpus.sample_texts(domain, 400, seed=seed, split="heldout", min_chars=0):
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) >= per * ctx:
                break
        n = min(per, len(ids) // ctx)
        rows += list(torch.tensor(ids[: n * ctx]).view(n, ctx))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return torch.stack([rows[i] for i in order[:n_seqs]])


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy, skipping the prediction made at position 0."""
    lp = logits[:, 1:-1].float().log_softmax(-1)  # [b, seq-2, vocab]
    return float(-lp.gather(-1, ids[:, 2:, None]).mean())


@torch.no_grad()
def evaluate(bundle: Bundle, dead_tokens: int = 32768, fit_tokens: int = 8192, ce_tokens: int = 2048,
             ctx: int = 128, batch: int = 16, seed: int = 1, ce_every: int = 1) -> dict:
    """Report per SAE; the spliced CE (one forward per SAE) is computed for every ``ce_every``-th
    layer only (None elsewhere), which bounds the cost on a CPU."""
    keys = sorted(bundle.saes)
    ids_all = heldout_batches(bundle.tokenizer, max(dead_tokens, fit_tokens, ce_tokens) // ctx + 1, ctx, seed)
    fired = {k: torch.zeros(bundle.width(*k), dtype=torch.bool) for k in keys}
    sums = {k: {"err": 0.0, "x": torch.zeros(bundle.d_model, dtype=torch.float64), "xx": 0.0, "n": 0, "l0": 0.0}
            for k in keys}
    n_fit = 0
    mods = {k: bundle.module(*k) for k in keys}
    n_rows = min(len(ids_all), -(-dead_tokens // ctx))
    for i in tqdm(range(0, n_rows, batch), desc="fve/l0/dead"):
        ids = ids_all[i:i + batch].to(bundle.device)
        store: dict = {}
        with bundle.lock, S.capture_sites(mods, store):
            bundle.model.model(input_ids=ids)
        res = [store[(l, "res")] for l in bundle.layers if (l, "res") in store]
        keep = ~sink_mask(torch.stack(res)) if res else None  # [b, seq]: attention sinks by norm
        if keep is None:
            keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            keep[:, 0] = False
        for k in keys:
            x = store[k][keep].float()  # [N, d] without attention sinks
            z = bundle.encode(*k, x)  # [N, d_sae]
            fired[k] |= (z > 0).any(0).cpu()
            if n_fit < fit_tokens:
                x_hat = bundle.sae(*k).decode(z.to(bundle.sae(*k).W_dec.dtype)).float()
                s = sums[k]
                s["err"] += float((x - x_hat).pow(2).sum())
                s["x"] += x.double().sum(0).cpu()
                s["xx"] += float(x.double().pow(2).sum())
                s["n"] += x.shape[0]
                s["l0"] += float((z > 0).sum())
        n_fit += ids.shape[0] * (ctx - 1)
    ce_ids = ids_all[: max(1, ce_tokens // ctx)].to(bundle.device)
    with bundle.lock:
        ce_clean = _ce(bundle.model(input_ids=ce_ids).logits, ce_ids)
    report = {}
    for k in tqdm(keys, desc="spliced CE"):
        sae = bundle.sae(*k)
        s = sums[k]
        total_var = s["xx"] - float(s["x"].pow(2).sum()) / s["n"]
        row = {"layer": k[0], "site": k[1], "width": bundle.width(*k), "fve": round(1 - s["err"] / total_var, 4),
               "l0": round(s["l0"] / s["n"], 2), "dead": round(1 - float(fired[k].float().mean()), 4),
               "ce_clean": round(ce_clean, 4), "ce_spliced": None, "ce_increase": None}
        report[f"{k[0]}/{k[1]}"] = row
        if k[0] % ce_every:
            continue

        def splice(h, sae=sae):
            h = h.clone()
            h[:, 1:] = sae(h[:, 1:].to(sae.W_dec.dtype)).to(h.dtype)
            return h

        with bundle.lock, S.edit_sites({k: mods[k]}, {k: splice}):
            ce_sp = _ce(bundle.model(input_ids=ce_ids).logits, ce_ids)
        row.update(ce_spliced=round(ce_sp, 4), ce_increase=round(ce_sp - ce_clean, 4))
    return {"preset": bundle.preset.name,
            "tokens": {"dead": n_rows * (ctx - 1), "fit": min(n_fit, fit_tokens), "ce": ce_ids.numel()},
            "seed": seed, "ce_every": ce_every, "saes": report, "summary": summarize(report)}


def summarize(report: dict) -> dict:
    out = {}
    for site in ("res", "mlp", "attn"):
        rows = [r for r in report.values() if r["site"] == site]
        if not rows:
            continue
        out[site] = {}
        for m in ("fve", "l0", "dead", "ce_increase"):
            vals = [r[m] for r in rows if r[m] is not None]
            out[site][m] = {"mean": round(sum(vals) / len(vals), 4), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def markdown_table(report: dict) -> str:
    lines = ["| SAE | width | FVE | L0 | dead | CE increase (nats) |", "|---|---|---|---|---|---|"]
    for key, r in sorted(report["saes"].items(), key=lambda kv: (kv[1]["site"], kv[1]["layer"])):
        ce = "-" if r["ce_increase"] is None else f"{r['ce_increase']:.3f}"
        lines.append(f"| {key} | {r['width']} | {r['fve']:.3f} | {r['l0']:.1f} | {r['dead']:.1%} | {ce} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Quality report of a preset's SAEs on held-out text")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, default=Path("assets/saes_v2/report.json"))
    p.add_argument("--dead-tokens", type=int, default=32768)
    p.add_argument("--fit-tokens", type=int, default=8192)
    p.add_argument("--ce-tokens", type=int, default=2048)
    p.add_argument("--ce-every", type=int, default=1, help="spliced CE for every n-th layer only")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    bundle = Bundle.load(a.preset, device=a.device, progress=lambda it: tqdm(it, desc="loading SAEs"))
    report = evaluate(bundle, a.dead_tokens, a.fit_tokens, a.ce_tokens, ce_every=a.ce_every)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    a.out.with_suffix(".md").write_text(markdown_table(report) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
