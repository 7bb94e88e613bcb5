"""Would a closed-form decoder refit raise the residual SAEs' FVE? (issue 16; measured, not adopted)

    python scripts/decoder_refit_check.py --tokens 60000 --out results/default/alignment/decoder_refit_60k.json

With each residual SAE's encoder fixed, the decoder that minimises the squared reconstruction
error on a sample of training text is a least-squares solution. This script collects
G = Z^T Z [w, w] and B = Z^T (X - b_dec) [w, d] over ``--tokens`` non-sink training tokens
(the session-12 mix, `TokenStream`, seed 123), then solves W = (G + lam I)^-1 (B + lam W_0)
(ridge toward the shipped decoder W_0; b_dec fixed, since the encoder subtracts it) for several
lam, and reports on held-out text (`alignment.capture`, 2,048 tokens per domain, as in
alignment.json) the mean FVE over layers per domain, the share of all latents whose top-1 decoder
cosine with the previous layer's reaches t(R) = 0.5 (all latents, not only active ones), and the
mean cosine of each refit decoder row with the shipped one. ~5 min on 2 CPU cores for 60k tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from steering.bundle import Bundle
from steering.training import alignment as A
from steering.training.train import TokenStream, collect

MIX = dict(prose=0.33, code=0.25, math=0.14, everyday=0.23, stories=0.05)  # the session-12 residual run's
DOMAINS = ("prose", "code", "math", "everyday", "stories")
RIDGE = (1e4, 1e3, 1e2, 10.0, 1.0)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=60000)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    b = Bundle.load("default", sites=["res"])
    L = list(b.layers)
    saes = [b.sae(l, "res") for l in L]
    w, d = saes[0].W_dec.shape
    ts = TokenStream(b.tokenizer, MIX, 128, seed=123, split="train")
    G = torch.zeros(len(L), w, w, dtype=torch.float64)
    B = torch.zeros(len(L), w, d, dtype=torch.float64)
    n = 0
    with tqdm(total=a.tokens, desc="Z^T Z, Z^T X") as bar:
        while n < a.tokens:
            acts, _ = collect(b.model, b.preset.arch, b.n_layers, ts.batch(16), b.device, sites=("res",))
            x = acts["res"]  # [L, N, d], sinks dropped
            for i, sae in enumerate(saes):
                z = sae.encode(x[i]).float()  # [N, w]
                G[i] += (z.T @ z).double()
                B[i] += (z.T @ (x[i] - sae.b_dec.float())).double()
            n += x.shape[1]
            bar.update(x.shape[1])
    held = {dom: A.capture(b, A.domain_texts(dom), 2048) for dom in DOMAINS}
    W0 = torch.stack([sae.W_dec.float() for sae in saes]).double()  # [L, w, d]
    out = {"train_tokens": n, "mix": MIX, "held_out_tokens_per_domain": 2048, "runs": {}}
    for lam in (None, *RIDGE):
        Wn = W0 if lam is None else torch.linalg.solve(G + lam * torch.eye(w, dtype=torch.float64), B + lam * W0)
        Wf = Wn.float()
        row = {}
        for dom, acts in held.items():
            f = [A.fve(acts[(l, "res")], saes[i].encode(acts[(l, "res")]).float() @ Wf[i] + saes[i].b_dec.float())
                 for i, l in enumerate(L)]
            row[f"fve_{dom}"] = round(sum(f) / len(f), 4)
        u = Wf / Wf.norm(dim=-1, keepdim=True)
        share = [float(((u[i] @ u[i - 1].T).max(1).values >= A.T_RES).float().mean()) for i in range(1, len(L))]
        row["share_all_latents_s_res_ge_0.5"] = round(sum(share) / len(share), 4)
        cos = torch.nn.functional.cosine_similarity(Wf, W0.float(), dim=-1)  # [L, w]
        row["mean_cos_to_shipped_row"] = round(float(cos.mean()), 4)
        out["runs"]["shipped" if lam is None else f"ridge_{lam:g}"] = row
        logging.info("%s %s", "shipped" if lam is None else lam, row)
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
