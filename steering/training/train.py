"""Train TopK SAEs for every (layer, site) of a preset from one streamed forward pass.

One command (CPU or GPU, same code):

    python -m steering.training.train --out assets/saes --max-minutes 70

Design (issue 4): activations are streamed, never stored; one model forward feeds all
n_layers x 3 SAEs; the SAEs of one site are stacked and trained with batched matmuls; position 0
(the attention sink, ~100x norm) is skipped. Inputs are scaled by a fixed per-SAE constant so
that mean ||x||^2 = d_model, and the constant is folded back into the weights at save time, so
the saved SAE reads raw activations. Decoder rows are kept unit norm. Dead features are
resampled toward badly reconstructed inputs during the first part of training.

Saved per SAE (sae-lens ``load_from_disk`` format): ``cfg.json`` + ``sae_weights.safetensors``
(fp16) + ``ref_scale.safetensors`` (mean non-zero activation per feature, METHOD.md "Units").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .. import sites as S
from ..bundle import REF_SCALE_FILE, load_model, pick_device
from ..presets import SITES, get_preset, hook_name
from . import corpus

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Fields:
    preset: preset whose model is read.
    widths: SAE width per site (res wider: users pick and steer res features).
    k: active features per token (TopK).
    ctx: tokens per training sequence.
    batch_seqs: sequences per step (tokens per step = batch_seqs * (ctx - 1)).
    lr: Adam learning rate.
    max_tokens / max_minutes: stop at whichever comes first.
    mix: sampling weight per corpus domain.
    resample_every: steps between dead-feature resamplings (0: never).
    resample_until: fraction of the run after which no resampling happens.
    stats_from: fraction of the run after which reference scales are accumulated.
    checkpoint_minutes: save everything this often, so an interrupted run still ships.
    seed: seeds sampling and initialisation.
    """

    preset: str = "default"
    widths: dict = field(default_factory=lambda: {"res": 1536, "mlp": 512, "attn": 512})
    k: int = 32
    ctx: int = 128
    batch_seqs: int = 16
    lr: float = 1e-3
    max_tokens: int = 2_000_000
    max_minutes: float = 70.0
    mix: dict = field(default_factory=lambda: {"prose": 0.4, "stories": 0.1, "math": 0.2, "code": 0.3})
    resample_every: int = 150
    resample_until: float = 0.6
    stats_from: float = 0.5
    checkpoint_minutes: float = 15.0
    seed: int = 0


class TokenStream:
    """Random fixed-length chunks of tokenized documents, domains sampled by weight."""

    def __init__(self, tokenizer, mix: dict, ctx: int, seed: int, split: str = "train"):
        self.ctx, self.rng = ctx, random.Random(seed)
        self.chunks: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        eos = tokenizer.eos_token_id
        for domain in mix:
            ids: list[int] = []
            for doc in corpus.load_domain(domain, split):
                ids += tokenizer(doc)["input_ids"] + [eos]
            n = len(ids) // ctx
            self.chunks[domain] = torch.tensor(ids[: n * ctx]).view(n, ctx)
            self.token_counts[domain] = len(ids)
            log.info("%s: %d tokens, %d chunks", domain, len(ids), n)
        self.domains = list(mix)
        self.weights = [mix[d] for d in self.domains]

    def batch(self, n: int) -> torch.Tensor:
        """[n, ctx] token ids."""
        rows = []
        for d in self.rng.choices(self.domains, self.weights, k=n):
            c = self.chunks[d]
            rows.append(c[self.rng.randrange(len(c))])
        return torch.stack(rows)


class StackedTopK(torch.nn.Module):
    """n TopK SAEs of one width trained together.  Shapes: x [n, N, d]."""

    def __init__(self, n: int, d: int, w: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.empty(n, d, w))
        self.b_enc = torch.nn.Parameter(torch.zeros(n, 1, w))
        self.W_dec = torch.nn.Parameter(torch.empty(n, w, d))
        self.b_dec = torch.nn.Parameter(torch.zeros(n, 1, d))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, gen: torch.Generator) -> None:
        """b_dec = input mean; random unit decoder rows; encoder = decoder^T (TopK-SAE init)."""
        n, _, d = x.shape
        self.b_dec.copy_(x.mean(1, keepdim=True))
        rows = torch.randn(self.W_dec.shape, generator=gen)
        self.W_dec.copy_(rows / rows.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.transpose(1, 2))

    @torch.no_grad()
    def grad_step(self, x: torch.Tensor):
        """Forward + backward of the summed normalized MSE, gradients written to ``.grad``.

        Only two things touch all w features: the dense encoder matmul and the top-k. The rest
        runs on the k active features as sparse CSR products (reconstruction, decoder and
        encoder gradients, and a sampled dense-dense product for d loss / d activation), which
        is what makes training 90 SAEs feasible on a CPU. tests/test_training.py checks these
        gradients against dense autograd.

        Returns reconstruction [n, N, d], active values [n, N, k], indices [n, N, k] and the
        per-SAE normalized error [n].
        """
        n, N, d = x.shape
        xc = x - self.b_dec  # [n, N, d]
        vals, idx = torch.baddbmm(self.b_enc, xc, self.W_enc).topk(self.k, dim=-1)  # [n, N, k]
        a = vals.relu()
        crow = torch.arange(0, N * self.k + 1, self.k, device=x.device)
        w = self.W_dec.shape[1]
        x_hat = torch.empty_like(x)
        nmse = torch.empty(n, device=x.device)
        grads = {p: torch.empty_like(p) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)}
        for i in range(n):
            cols = idx[i].reshape(-1)
            Z = torch.sparse_csr_tensor(crow, cols, a[i].reshape(-1), (N, w))
            x_hat[i] = torch.sparse.mm(Z, self.W_dec[i]) + self.b_dec[i]
            err = x_hat[i] - x[i]  # [N, d]
            var = (x[i] - x[i].mean(0)).pow(2).sum()
            nmse[i] = err.pow(2).sum() / var
            g = 2 * err / var  # d loss / d x_hat
            grads[self.W_dec][i] = Z.t() @ g
            da = torch.sparse.sampled_addmm(Z, g, self.W_dec[i].T, beta=0.0).values().view(N, self.k)
            dpre = da * (vals[i] > 0)  # [N, k]
            D = torch.sparse_csr_tensor(crow, cols, dpre.reshape(-1), (N, w))
            grads[self.W_enc][i] = (D.t() @ xc[i]).T
            grads[self.b_enc][i, 0] = torch.zeros(w, device=x.device).index_add_(0, cols, dpre.reshape(-1))
            dxc = torch.sparse.mm(D, self.W_enc[i].T.contiguous())  # [N, d]
            grads[self.b_dec][i, 0] = g.sum(0) - dxc.sum(0)
        for p, gr in grads.items():
            p.grad = gr
        return x_hat, a, idx, nmse

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def _collect(model, arch: str, n_layers: int, ids: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Site activations without position 0: {site: [n_layers, N, d]}."""
    mods = {(l, s): S.site_module(model, arch, l, s) for l in range(n_layers) for s in SITES}
    store: dict = {}
    with torch.no_grad(), S.capture_sites(mods, store):
        model.model(input_ids=ids.to(device))  # the decoder stack only: no lm_head logits
    d = next(iter(store.values())).shape[-1]
    return {s: torch.stack([store[(l, s)][:, 1:].reshape(-1, d) for l in range(n_layers)]).float()
            for s in SITES}


def save_sae(folder: Path, layer: int, site: str, W_enc, b_enc, W_dec, b_dec, k: int,
             ref_scale: torch.Tensor, extra: dict) -> None:
    """One SAE in sae-lens TopK format (fp16 weights) + its reference scales."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d, w = W_enc.shape
    cfg = TopKSAEConfig(d_in=d, d_sae=w, k=k, dtype="float32",
                        metadata=SAEMetadata(hook_name=hook_name(layer, site), **extra))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.reshape(getattr(sae, name).shape))
    sae.to(torch.float16)
    sae.cfg.dtype = "float16"
    folder.mkdir(parents=True, exist_ok=True)
    sae.save_model(folder)
    save_file({"ref_scale": ref_scale.float().contiguous()}, str(folder / REF_SCALE_FILE))


def train(cfg: TrainConfig, out: Path, device: str | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    preset = get_preset(cfg.preset)
    dev = pick_device(device)
    model, tok = load_model(preset, dev, torch.float32)
    L, d = preset.n_layers, preset.d_model
    stream = TokenStream(tok, cfg.mix, cfg.ctx, cfg.seed)
    saes = {s: StackedTopK(L, d, cfg.widths[s], cfg.k).to(dev) for s in SITES}

    first = _collect(model, preset.arch, L, stream.batch(cfg.batch_seqs), dev)
    # Per-SAE input scale c so that mean ||x/c||^2 = d (folded back at save time).
    scale = {s: (first[s].pow(2).sum(-1).mean(-1) / d).sqrt()[:, None, None] for s in SITES}  # [L,1,1]
    for s in SITES:
        saes[s].init_from(first[s] / scale[s], gen)
    opts = {s: torch.optim.Adam(saes[s].parameters(), lr=cfg.lr, betas=(0.9, 0.999)) for s in SITES}
    tokens_per_step = cfg.batch_seqs * (cfg.ctx - 1)
    total_steps = cfg.max_tokens // tokens_per_step
    fired = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in SITES}  # since last resample
    act_sum = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in SITES}
    act_cnt = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in SITES}
    fve_ema = {s: torch.zeros(L, device=dev) for s in SITES}
    t0 = last_ckpt = time.time()
    step = 0
    bar = tqdm(total=total_steps, desc="train SAEs", unit="step")

    def progress() -> float:
        return max(step / total_steps, (time.time() - t0) / 60 / cfg.max_minutes)

    def checkpoint() -> None:
        _save_all(out, cfg, saes, scale, act_sum, act_cnt, stream.token_counts,
                  step * tokens_per_step, fve_ema, time.time() - t0)

    while step < total_steps and (time.time() - t0) / 60 < cfg.max_minutes:
        acts = _collect(model, preset.arch, L, stream.batch(cfg.batch_seqs), dev)
        for s in SITES:
            x = acts[s] / scale[s]  # [L, N, d]
            x_hat, vals, idx, nmse = saes[s].grad_step(x)  # normalized MSE per SAE, grads set
            opts[s].step()
            saes[s].normalize_decoder()
            with torch.no_grad():
                flat, v = idx.reshape(L, -1), vals.reshape(L, -1)
                active = torch.zeros(L, cfg.widths[s], device=dev).scatter_add_(1, flat, (v > 0).float())
                z_sum = torch.zeros(L, cfg.widths[s], device=dev).scatter_add_(1, flat, v)  # [L, w]
                fired[s] += active
                fve_ema[s].mul_(0.95).add_(0.05 * (1 - nmse)) if step else fve_ema[s].copy_(1 - nmse)
                if progress() >= cfg.stats_from:
                    act_sum[s] += z_sum * scale[s][:, 0]
                    act_cnt[s] += active
                if (cfg.resample_every and step and step % cfg.resample_every == 0
                        and progress() < cfg.resample_until):
                    _resample(saes[s], opts[s], fired[s], x, x_hat, gen)
                    fired[s].zero_()
        step += 1
        bar.update(1)
        bar.set_postfix({s: f"{fve_ema[s].mean():.3f}" for s in SITES})
        if (time.time() - last_ckpt) / 60 > cfg.checkpoint_minutes:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    checkpoint()
    return json.loads((out / "train_config.json").read_text())


@torch.no_grad()
def _resample(sae: StackedTopK, opt, fired: torch.Tensor, x, x_hat, gen) -> None:
    """Point features that never fired since the last resample at badly reconstructed inputs."""
    n, N, d = x.shape
    err = (x - x_hat).pow(2).sum(-1)  # [n, N]
    state = opt.state
    for i in range(n):
        dead = (fired[i] == 0).nonzero().flatten()
        if len(dead) == 0:
            continue
        pick = torch.multinomial(err[i], len(dead), replacement=True, generator=gen)
        dirs = x[i, pick] - x_hat[i, pick]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [n_dead, d]
        sae.W_dec[i, dead] = dirs
        sae.W_enc[i, :, dead] = dirs.T * 0.2
        sae.b_enc[i, 0, dead] = 0.0
        for p, sl in ((sae.W_dec, (i, dead)), (sae.W_enc, (i, slice(None), dead)), (sae.b_enc, (i, 0, dead))):
            if p in state:
                state[p]["exp_avg"][sl] = 0
                state[p]["exp_avg_sq"][sl] = 0


def _save_all(out: Path, cfg: TrainConfig, saes, scale, act_sum, act_cnt, token_counts,
              tokens_seen: int, fve_ema, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for s, sae in saes.items():
        for l in range(sae.W_enc.shape[0]):
            c = scale[s][l, 0, 0]
            mean_act = act_sum[s][l] / act_cnt[s][l].clamp_min(1)
            fill = mean_act[act_cnt[s][l] > 0].median() if (act_cnt[s][l] > 0).any() else c
            ref = torch.where(act_cnt[s][l] > 0, mean_act, fill).cpu()
            # Fold the input scale c back in (module docstring): the SAE reads raw activations.
            save_sae(out / s / f"layer_{l}", l, s,
                     W_enc=sae.W_enc[l].cpu(), b_enc=(sae.b_enc[l, 0] * c).cpu(),
                     W_dec=sae.W_dec[l].cpu(), b_dec=(sae.b_dec[l, 0] * c).cpu(), k=sae.k,
                     ref_scale=ref, extra={"input_scale": float(c)})
    (out / "train_config.json").write_text(json.dumps({
        "config": asdict(cfg), "tokens_seen": tokens_seen, "seconds": round(seconds, 1),
        "corpus_tokens": token_counts, "train_fve_ema": {s: [round(v, 4) for v in fve_ema[s].tolist()] for s in saes},
    }, indent=2))
    log.info("saved %d SAEs to %s after %d tokens", sum(s.W_enc.shape[0] for s in saes.values()), out, tokens_seen)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("assets/saes"))
    p.add_argument("--preset", default="default")
    p.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    p.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes)
    p.add_argument("--k", type=int, default=TrainConfig.k)
    p.add_argument("--batch-seqs", type=int, default=TrainConfig.batch_seqs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--widths", default="res=1536,mlp=512,attn=512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    widths = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.widths.split(",")}
    cfg = TrainConfig(preset=a.preset, widths=widths, k=a.k, batch_seqs=a.batch_seqs, lr=a.lr,
                      max_tokens=a.max_tokens, max_minutes=a.max_minutes, seed=a.seed)
    train(cfg, a.out, a.device)


if __name__ == "__main__":
    main()
