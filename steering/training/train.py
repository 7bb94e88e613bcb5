"""Train TopK SAEs for every (layer, site) of a preset from one streamed forward pass.

One command, resumable, CPU or GPU (same code):

    python -m steering.training.train --out assets/saes_v2 --max-minutes 70
    python -m steering.training.train --out /tmp/saes --device cuda --max-tokens 20000000 --max-minutes 9

Design (issues 4 and 16):
- Activations are streamed, never stored; one model forward feeds all n_layers x 3 SAEs; the
  SAEs of one site are stacked and trained together (one batched encoder matmul, one
  block-diagonal sparse product for everything else, `StackedTopK.grad_step`).
- Attention sinks (found by residual norm, `steering.sinks`) are dropped from every batch.
- Cross-layer alignment: by default the SAEs of a site start from ONE shared random dictionary
  (``init="shared"``), so a feature that the residual stream carries from layer to layer keeps
  its index and direction (paper §3.2 matching relies on comparable dictionaries); the choice was
  made by measurement, see docs/saes.md. ``init="independent"`` is the control.
- Steps that count: small batches (about 1k tokens a step), linear warm-up then cosine decay of
  the learning rate over the budget (tokens or minutes, whichever ends first), dead latents
  resampled toward badly reconstructed inputs during the first part of training.
- Inputs are scaled by a fixed per-SAE constant so that mean ||x||^2 = d_model; the constant is
  folded back into the weights at save time, so the saved SAE reads raw activations. Decoder rows
  are kept unit norm.
- Checkpoints (weights, Adam state, statistics, RNG and stream state) go to
  ``$FFP_CACHE/training/<config hash>/ckpt.pt`` every ``checkpoint_minutes``; the same command
  resumes from there.

Saved per SAE (sae-lens ``load_from_disk`` format): ``cfg.json`` + ``sae_weights.safetensors``
(fp16) + ``ref_scale.safetensors`` (mean non-zero activation per feature, paper §5.3 units).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .. import sites as S
from ..bundle import REF_SCALE_FILE, cache_dir, load_model, pick_device
from ..presets import SITES, get_preset, hook_name
from ..sinks import sink_mask
from . import corpus
from .stacked import BACKENDS, StackedTopK, alignment_penalty_grad

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Fields:
    preset: preset whose model is read.
    widths: SAE width per site (res wider: users pick and steer res features).
    k: active latents per token (TopK) per site.
    init: ``shared`` (one random dictionary for all layers of a site) or ``independent``.
    ctx: tokens per training sequence.
    batch_seqs: sequences per step (tokens per step about batch_seqs * (ctx - 1), sinks dropped).
    lr, warmup_steps, lr_final: peak Adam learning rate, linear warm-up, final fraction of the
        peak after cosine decay.
    max_tokens / max_minutes: stop at whichever comes first (the schedule follows the nearer).
    mix: sampling weight per corpus domain (steering/training/corpus.py).
    enc_dtype: dtype of the dense matmuls of the SAE step (``bfloat16`` or ``float32``).
    backend: ``fused`` (default: `fused_topk_step`, compiled with torch.compile when ``compile``),
        ``dense`` or ``sparse`` kernels for the SAE step (`StackedTopK.grad_step`).
    compile: compile the fused step with torch.compile (inductor; falls back to eager, logged,
        where compilation fails).
    init_from: warm start: a folder of saved SAEs (``{site}/layer_{l}``, this trainer's format)
        whose weights and input scales the run continues from instead of a random init.
    align_weight: weight of a cross-layer term on the residual SAEs (0: off): the mean squared
        distance between decoder rows of the same index at neighbouring layers,
        `alignment_penalty_grad`. With a shared initial dictionary the indices start matched; the
        term keeps them so while the layers train (docs/saes.md: without it, a longer run lets
        neighbouring dictionaries drift apart). Validate with the data-based transfer check and
        Table 1, never with the cosines it optimises.
    model_dtype: dtype of the model forward that produces the activations (bf16 is 2.4x faster
        on the 2-core CPU; the SAEs are evaluated on float32 activations, docs/saes.md).
    resample_every: steps between dead-latent resamplings (0: never).
    resample_until: fraction of the run after which no resampling happens.
    stats_from: fraction of the run after which reference scales are accumulated.
    checkpoint_minutes: save a resumable checkpoint this often.
    revive_dead: warm start only: train nothing but the latents that are dead. Until step
        ``resample_every`` the run only counts which latents fire (no update; the learning-rate
        warm-up passes meanwhile); those that never fired, however rare a feature they were, are
        resampled (`_resample`) and become the only trainable latents: every other encoder
        column, bias and decoder row, and b_dec, gets a zero gradient, so Adam leaves it where it
        is (decoder rows are renormalised each step, a float rounding only). Merged with
        ``scripts/merge_continued_saes.py --revived-only``, the latents that fired keep their
        saved weights, reference scales and matches; the revived slots hold new features (their
        catalog entries must be rebuilt). The revived indices go to train_config.json
        (``revived``); a run that ends before step ``resample_every`` raises.
    revive_max_fires: with revive_dead, a latent that fired at most this many times over the
        window counts as dead too (0: only those that never fired). A latent that fires once in
        the ~150k tokens of a 150-step window is dead on any held-out set of a few 10k tokens.
        After the window, the periodic resampling (until ``resample_until``) takes revived latents
        that did not fire at all since the last one, as in any run.
    revive_layers: with revive_dead, revive only at these layers (None: every layer).
    drop_loops: leave out the generated everyday texts that fell into a loop (`corpus.degenerate`:
        125 of the 2,314 training texts, e.g. " tomorrow" ~40 times in a row), as the catalog does since session 14;
        runs before session 15 trained on them.
    seed: seeds sampling and initialisation.
    """

    preset: str = "default"
    widths: dict = field(default_factory=lambda: {"res": 1024, "mlp": 384, "attn": 384})
    k: dict = field(default_factory=lambda: {"res": 48, "mlp": 48, "attn": 48})
    init: str = "shared"
    ctx: int = 128
    batch_seqs: int = 8
    lr: float = 1.5e-3
    warmup_steps: int = 100
    lr_final: float = 0.1
    max_tokens: int = 3_000_000
    max_minutes: float = 70.0
    mix: dict = field(default_factory=lambda: {"prose": 0.35, "everyday": 0.15, "stories": 0.05,
                                               "math": 0.15, "code": 0.3})
    enc_dtype: str = "bfloat16"
    backend: str = "fused"
    compile: bool = True
    init_from: str | None = None
    align_weight: float = 0.0
    model_dtype: str = "bfloat16"
    resample_every: int = 250
    resample_until: float = 0.6
    stats_from: float = 0.5
    checkpoint_minutes: float = 10.0
    revive_dead: bool = False
    revive_max_fires: int = 0
    revive_layers: tuple | None = None
    drop_loops: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("shared", "independent"):
            raise ValueError(f"init must be 'shared' or 'independent', got {self.init!r}")
        if isinstance(self.k, int):
            self.k = {s: self.k for s in self.widths}
        self.k = {**{s: 48 for s in self.widths}, **self.k}  # sites not named keep the default k
        for s in self.widths:
            if s not in SITES:
                raise ValueError(f"unknown site {s!r} in widths; valid: {', '.join(SITES)}")
            if not 0 < self.k[s] <= self.widths[s]:
                raise ValueError(f"k for {s} must be in 1..{self.widths[s]}, got {self.k[s]}")
        for name in ("enc_dtype", "model_dtype"):
            if getattr(self, name) not in ("bfloat16", "float32"):
                raise ValueError(f"{name} must be bfloat16 or float32, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.revive_dead and not (self.init_from and self.resample_every > 0):
            raise ValueError("revive_dead needs init_from (the SAEs whose dead latents are revived) "
                             "and resample_every > 0 (the steps that find them)")
        if (self.revive_max_fires or self.revive_layers is not None) and not self.revive_dead:
            raise ValueError("revive_max_fires and revive_layers need revive_dead")
        if self.revive_max_fires < 0:
            raise ValueError(f"revive_max_fires must be >= 0, got {self.revive_max_fires}")
        if self.revive_layers is not None:
            self.revive_layers = tuple(sorted(set(int(x) for x in self.revive_layers)))
            if not self.revive_layers:
                raise ValueError("revive_layers is empty: name at least one layer, or leave it out for all")

    def key(self, corpus_tokens: dict | None = None, init_weights: str | None = None) -> str:
        """Hash of everything but the budget (and of the corpus' token counts and the warm start's
        weights, `init_fingerprint`): a resumed run must train the same thing on the same text from
        the same start (the same --init-from folder after a merge is another start)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("max_minutes", "checkpoint_minutes")}
        for name, default in (("revive_dead", False), ("revive_max_fires", 0), ("revive_layers", None),
                              ("drop_loops", False)):
            if d[name] == default:  # the hash of runs made before the option existed
                d.pop(name)
        if corpus_tokens:
            d["corpus_tokens"] = corpus_tokens
        if init_weights:
            d["init_weights"] = init_weights
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class TokenStream:
    """Random fixed-length chunks of tokenized documents, domains sampled by weight."""

    def __init__(self, tokenizer, mix: dict, ctx: int, seed: int, split: str = "train", drop_loops: bool = False):
        """``drop_loops``: leave out generated everyday texts that fell into a loop (`corpus.degenerate`)."""
        self.ctx, self.rng = ctx, random.Random(seed)
        self.chunks: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        eos = tokenizer.eos_token_id
        for domain in mix:
            ids: list[int] = []
            docs = corpus.load_domain(domain, split)
            if drop_loops:
                docs = corpus.without_loops(domain, docs, "training text")
            for doc in docs:
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


def collect(model, arch: str, n_layers: int, ids: torch.Tensor, device,
            sites: tuple[str, ...] = SITES, dtype: torch.dtype | None = torch.float32,
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Site activations at every non-sink token: ({site: [n_layers, N, d]}, keep mask [b, seq]).

    ``dtype``: of the returned activations (None: the model's own, e.g. bf16, saving a pass).
    Sinks are found from the residual stream of all layers (`steering.sinks.sink_mask`)."""
    need = tuple(dict.fromkeys(("res", *sites)))
    mods = {(l, s): S.site_module(model, arch, l, s) for l in range(n_layers) for s in need}
    store: dict = {}
    with torch.no_grad(), S.capture_sites(mods, store):
        model.model(input_ids=ids.to(device))  # the decoder stack only: no lm_head logits
    keep = ~sink_mask(torch.stack([store[(l, "res")] for l in range(n_layers)]))  # [b, seq]
    acts = {s: torch.stack([store[(l, s)][keep] for l in range(n_layers)]) for s in sites}
    return ({s: a.to(dtype) for s, a in acts.items()} if dtype is not None else acts), keep


def lr_factor(progress: float, step: int, warmup_steps: int, final: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``final`` over progress 0..1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * cos


def train(cfg: TrainConfig, out: Path, device: str | None = None, ckpt_dir: Path | None = None) -> dict:
    """Train (or resume) and save every SAE to ``out``; returns the saved train_config.json."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    preset = get_preset(cfg.preset)
    dev = pick_device(device)
    model, tok = load_model(preset, dev, getattr(torch, cfg.model_dtype))
    L, d = preset.n_layers, preset.d_model
    if cfg.revive_layers is not None:  # before the first window runs, not at its end
        revive_mask(torch.zeros(L, 1), cfg.revive_max_fires, cfg.revive_layers)
    sites = tuple(s for s in SITES if s in cfg.widths)
    enc_dtype = getattr(torch, cfg.enc_dtype)
    stream = TokenStream(tok, cfg.mix, cfg.ctx, cfg.seed, drop_loops=cfg.drop_loops)
    saes = {s: StackedTopK(L, d, cfg.widths[s], cfg.k[s]).to(dev) for s in sites}
    init_weights = init_fingerprint(Path(cfg.init_from), sites, L) if cfg.init_from else None
    ckpt = (ckpt_dir or cache_dir() / "training" / cfg.key(stream.token_counts, init_weights)) / "ckpt.pt"
    state = torch.load(ckpt, map_location=dev, weights_only=False) if ckpt.is_file() else None

    if state is None and cfg.init_from:
        scale = {s: load_stacked(saes[s], Path(cfg.init_from), s, gen) for s in sites}
        log.info("warm start from %s", cfg.init_from)
    elif state is None:
        first, _ = collect(model, preset.arch, L, stream.batch(cfg.batch_seqs), dev, sites)
        # Per-SAE input scale c so that mean ||x/c||^2 = d (folded back at save time).
        scale = {s: (first[s].pow(2).sum(-1).mean(-1) / d).sqrt()[:, None, None] for s in sites}  # [L,1,1]
        for s in sites:
            saes[s].init_from(first[s] / scale[s], gen, shared=cfg.init == "shared")
    # Fused Adam: one kernel over all parameters (about 5x the default's step rate on 2 cores).
    opts = {s: torch.optim.Adam(saes[s].parameters(), lr=cfg.lr, betas=(0.9, 0.999), fused=True)
            for s in sites}
    fired = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in sites}  # since last resample
    act_sum = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in sites}
    act_cnt = {s: torch.zeros(L, cfg.widths[s], device=dev) for s in sites}
    fve_ema = {s: torch.zeros(L, device=dev) for s in sites}
    trainable: dict[str, torch.Tensor] = {}  # revive_dead: site -> [L, w] bool, set after the first window
    step, tokens_seen, elapsed = 0, 0, 0.0
    if state is not None:
        for s in sites:
            saes[s].load_state_dict(state["saes"][s])
            opts[s].load_state_dict(state["opts"][s])
            for name, buf in (("fired", fired), ("act_sum", act_sum), ("act_cnt", act_cnt), ("fve_ema", fve_ema)):
                buf[s].copy_(state[name][s])
        scale = state["scale"]
        trainable = state.get("trainable", {})
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        gen.set_state(state["gen"].cpu())  # RNG states are CPU tensors even when training on a GPU
        stream.rng.setstate(state["stream_rng"])
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("resumed %s at step %d (%d tokens, %.1f min)", ckpt, step, tokens_seen, elapsed / 60)
    t0, last_ckpt = time.time() - elapsed, time.time()

    def progress() -> float:
        return max(tokens_seen / cfg.max_tokens, (time.time() - t0) / 60 / cfg.max_minutes)

    def checkpoint() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"saes": {s: m.state_dict() for s, m in saes.items()},
                    "opts": {s: o.state_dict() for s, o in opts.items()},
                    "fired": fired, "act_sum": act_sum, "act_cnt": act_cnt, "fve_ema": fve_ema,
                    "scale": scale, "trainable": trainable, "step": step, "tokens_seen": tokens_seen,
                    "elapsed": time.time() - t0,
                    "gen": gen.get_state(), "stream_rng": stream.rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)
        log.info("checkpoint %s at step %d", ckpt, step)

    bar = tqdm(total=cfg.max_tokens, initial=tokens_seen, desc="train SAEs", unit="tok", unit_scale=True)
    while progress() < 1:
        acts, keep = collect(model, preset.arch, L, stream.batch(cfg.batch_seqs), dev, sites, dtype=None)
        n_tok = int(keep.sum())
        lr = cfg.lr * lr_factor(progress(), step, cfg.warmup_steps, cfg.lr_final)
        for s in sites:
            for group in opts[s].param_groups:
                group["lr"] = lr
            x_hat, vals, idx, nmse = saes[s].grad_step(  # x_hat in scaled units; normalized MSE per SAE
                acts[s], enc_dtype, cfg.backend, inv_scale=1 / scale[s], compile=cfg.compile)
            if cfg.align_weight and s == "res":
                saes[s].W_dec.grad += alignment_penalty_grad(saes[s].W_dec, cfg.align_weight)[1]
            if not cfg.revive_dead:
                opts[s].step()
            elif s in trainable:  # only the revived latents move; nothing does while they are sought
                freeze_latents(saes[s], trainable[s])
                opts[s].step()
            saes[s].normalize_decoder()
            with torch.no_grad():
                flat, v = idx.reshape(L, -1), vals.reshape(L, -1)
                active = torch.zeros(L, cfg.widths[s], device=dev).scatter_add_(1, flat, (v > 0).float())
                z_sum = torch.zeros(L, cfg.widths[s], device=dev).scatter_add_(1, flat, v)  # [L, w]
                fired[s] += active
                fve_ema[s].mul_(0.98).add_(0.02 * (1 - nmse)) if step else fve_ema[s].copy_(1 - nmse)
                if progress() >= cfg.stats_from:
                    act_sum[s] += z_sum * scale[s][:, 0]
                    act_cnt[s] += active
                window_ends = cfg.revive_dead and s not in trainable and step >= cfg.resample_every
                if window_ends or (cfg.resample_every and step and step % cfg.resample_every == 0
                                   and progress() < cfg.resample_until):
                    if window_ends:
                        trainable[s] = revive_mask(fired[s], cfg.revive_max_fires, cfg.revive_layers)
                        log.info("revive_dead: %s: %d of %d latents fired at most %d times over %d steps "
                                 "(per layer %s)", s,
                                 int(trainable[s].sum()), trainable[s].numel(), cfg.revive_max_fires, step,
                                 trainable[s].sum(1).tolist())
                    if window_ends:  # every latent to revive is resampled, rare ones included
                        dead_now = (~trainable[s]).float()
                    elif s in trainable:  # later: the revived latents that have not fired since
                        dead_now = fired[s].masked_fill(~trainable[s], 1)
                    else:
                        dead_now = fired[s]
                    _resample(saes[s], opts[s], dead_now, acts[s].float() / scale[s], x_hat, gen)
                    fired[s].zero_()
        step += 1
        tokens_seen += n_tok
        bar.update(n_tok)
        bar.set_postfix({"lr": f"{lr:.1e}", **{s: f"{fve_ema[s].mean():.3f}" for s in sites},
                         "min": f"{(time.time() - t0) / 60:.1f}"})
        if (time.time() - last_ckpt) / 60 > cfg.checkpoint_minutes:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    checkpoint()
    if cfg.revive_dead and set(trainable) != set(sites):
        raise RuntimeError(f"revive_dead: the run ended at step {step}, before step {cfg.resample_every} that finds "
                           "the dead latents; nothing was trained (give it more --max-minutes / --max-tokens or a "
                           "smaller --resample-every)")
    _save_all(out, cfg, saes, scale, act_sum, act_cnt, stream.token_counts, tokens_seen, fve_ema,
              time.time() - t0, step, trainable)
    return json.loads((out / "train_config.json").read_text())


def init_fingerprint(folder: Path, sites, n_layers: int) -> str:
    """sha256 (12 hex digits) of the saved weights a warm start reads (``folder/{site}/layer_{l}``)."""
    h = hashlib.sha256()
    for s in sites:
        for l in range(n_layers):
            path = folder / s / f"layer_{l}" / "sae_weights.safetensors"
            h.update(path.read_bytes() if path.is_file() else b"missing")
    return h.hexdigest()[:12]


@torch.no_grad()
def load_stacked(sae: StackedTopK, folder: Path, site: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """Warm start: copy the saved SAEs ``folder/{site}/layer_{l}`` into ``sae`` (undoing the
    input-scale folding of `_save_all`); returns their input scales c [n, 1, 1].

    A wider run keeps the saved latents as latents 0..w0-1 (their indices, labels and matches
    stay) and adds w - w0 new ones: one random unit dictionary shared by all layers, encoder =
    decoder^T scaled to the median encoder-column norm of the saved latents of that layer (as
    `_resample` does), b_enc 0; those that stay dead are resampled.
    Raises ValueError when a file is missing or the saved SAE is wider or has another d."""
    from safetensors.torch import load_file

    n, d, w = sae.W_enc.shape
    scales, w0 = [], None
    for l in range(n):
        path = folder / site / f"layer_{l}"
        try:
            sw = load_file(str(path / "sae_weights.safetensors"))
            c = float(json.loads((path / "cfg.json").read_text())["metadata"]["input_scale"])
        except (FileNotFoundError, KeyError) as e:
            raise ValueError(f"init_from: {path} is not an SAE saved by this trainer ({e})") from e
        d0, w0 = (int(v) for v in sw["W_enc"].shape)
        if d0 != d or w0 > w:
            raise ValueError(f"init_from: {path} has W_enc {(d0, w0)}, the run expects ({d}, >= {w0}) "
                             f"up to its width {w} (check --widths)")
        sae.W_enc[l, :, :w0] = sw["W_enc"].float()
        sae.W_dec[l, :w0] = sw["W_dec"].float()
        sae.b_enc[l, 0, :w0] = sw["b_enc"].float() / c
        sae.b_dec[l, 0] = sw["b_dec"].float() / c
        scales.append(c)
    if w0 < w:
        rows = torch.randn((1, w - w0, d), generator=gen)  # [1, w - w0, d], shared by the n layers
        sae.W_dec[:, w0:] = rows / rows.norm(dim=-1, keepdim=True)
        # encoder columns as long as the saved latents' (median per layer): with 0.2 (session 12,
        # res 1024 -> 1152) the new latents lost the top-k race to the trained ones and 45-85% of
        # them never fired
        norm = sae.W_enc[:, :, :w0].norm(dim=1).median(dim=1).values  # [n]
        sae.W_enc[:, :, w0:] = norm[:, None, None] * sae.W_dec[:, w0:].transpose(1, 2)
        sae.b_enc[:, 0, w0:] = 0.0
        log.info("init_from: %s SAEs widened from %d to %d latents", site, w0, w)
    sae.normalize_decoder()
    return torch.tensor(scales, device=sae.W_enc.device)[:, None, None]


@torch.no_grad()
def _resample(sae: StackedTopK, opt, fired: torch.Tensor, x, x_hat, gen) -> None:
    """Point latents that never fired since the last resample at badly reconstructed inputs.

    The encoder column of a resampled latent is its decoder direction scaled to the median
    encoder-column norm of the latents that did fire (0.2 when none did, at the very start): a
    TopK latent fires only when it beats the k-th largest pre-activation, and a column much
    shorter than the trained ones never does (session 12: with a fixed 0.2, most latents added
    to trained residual SAEs stayed dead)."""
    n, N, d = x.shape
    err = (x - x_hat).pow(2).sum(-1)  # [n, N]
    state = opt.state
    for i in range(n):
        dead = (fired[i] == 0).nonzero().flatten()
        if len(dead) == 0:
            continue
        live = fired[i] > 0
        scale = float(sae.W_enc[i][:, live].norm(dim=0).median()) if live.any() else 0.2
        pick = torch.multinomial(err[i].cpu(), len(dead), replacement=True, generator=gen).to(x.device)
        dirs = x[i, pick] - x_hat[i, pick]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [n_dead, d]
        sae.W_dec[i, dead] = dirs
        sae.W_enc[i, :, dead] = dirs.T * scale
        sae.b_enc[i, 0, dead] = 0.0
        for p, sl in ((sae.W_dec, (i, dead)), (sae.W_enc, (i, slice(None), dead)), (sae.b_enc, (i, 0, dead))):
            if p in state:
                state[p]["exp_avg"][sl] = 0
                state[p]["exp_avg_sq"][sl] = 0


@torch.no_grad()
def revive_mask(fired: torch.Tensor, max_fires: int = 0, layers: tuple | None = None) -> torch.Tensor:
    """Latents to revive: [L, w] bool, True where a latent fired at most ``max_fires`` times over
    the window (``fired``: [L, w] counts) and its layer is in ``layers`` (None: all)."""
    mask = fired <= max_fires
    if layers is not None:
        bad = [x for x in layers if not 0 <= x < fired.shape[0]]
        if bad:
            raise ValueError(f"revive_layers {bad} out of range 0..{fired.shape[0] - 1}")
        keep = torch.zeros(fired.shape[0], dtype=torch.bool, device=fired.device)
        keep[list(layers)] = True
        mask &= keep[:, None]
    return mask


def freeze_latents(sae: StackedTopK, trainable: torch.Tensor) -> None:
    """Zero the gradients of every latent outside ``trainable`` [n, w] (bool) and of b_dec, so
    that Adam leaves them exactly where they are (its moments stay zero: the update is 0)."""
    frozen = ~trainable  # [n, w]
    sae.W_enc.grad.masked_fill_(frozen[:, None, :], 0)  # W_enc [n, d, w]
    sae.b_enc.grad.masked_fill_(frozen[:, None, :], 0)  # b_enc [n, 1, w]
    sae.W_dec.grad.masked_fill_(frozen[:, :, None], 0)  # W_dec [n, w, d]
    sae.b_dec.grad.zero_()


def _save_all(out: Path, cfg: TrainConfig, saes, scale, act_sum, act_cnt, token_counts,
              tokens_seen: int, fve_ema, seconds: float, steps: int, trainable: dict | None = None) -> None:
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
                     ref_scale=ref, extra={"input_scale": float(c), "init": cfg.init,
                                           "continued_from": cfg.init_from,
                                           "align_weight": cfg.align_weight if s == "res" else 0.0,
                                           "trained_tokens": int(tokens_seen)})
    (out / "train_config.json").write_text(json.dumps({
        "config": asdict(cfg), "tokens_seen": tokens_seen, "steps": steps, "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens_seen / max(seconds, 1e-9), 1),
        "corpus_tokens": token_counts, "train_fve_ema": {s: [round(v, 4) for v in fve_ema[s].tolist()] for s in saes},
        **({"revived": {s: [m.nonzero().flatten().tolist() for m in t] for s, t in trainable.items()}}
           if trainable else {}),
    }, indent=2))
    log.info("saved %d SAEs to %s after %d tokens", sum(s.W_enc.shape[0] for s in saes.values()), out, tokens_seen)


def _site_values(text: str, cast=int) -> dict:
    """``res=1024,mlp=384`` -> {"res": 1024, "mlp": 384}; a bare number applies to every site."""
    if "=" not in text:
        return {s: cast(text) for s in SITES}
    try:
        return {kv.split("=")[0].strip(): cast(kv.split("=")[1]) for kv in text.split(",")}
    except (IndexError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"expected site=value pairs like res=1024,mlp=384, got {text!r}") from e


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("assets/saes_v2"))
    p.add_argument("--preset", default="default")
    p.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    p.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes)
    p.add_argument("--widths", type=_site_values, default=None, help="e.g. res=1024,mlp=384,attn=384")
    p.add_argument("--k", type=_site_values, default=None, help="TopK k: one number or site=k pairs")
    p.add_argument("--init", choices=("shared", "independent"), default="shared")
    p.add_argument("--batch-seqs", type=int, default=TrainConfig.batch_seqs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--enc-dtype", choices=("bfloat16", "float32"), default=TrainConfig.enc_dtype)
    p.add_argument("--model-dtype", choices=("bfloat16", "float32"), default=TrainConfig.model_dtype)
    p.add_argument("--backend", choices=BACKENDS, default=TrainConfig.backend)
    p.add_argument("--no-compile", action="store_true", help="run the fused step eagerly (no torch.compile)")
    p.add_argument("--init-from", default=None, help="warm start from saved SAEs (e.g. assets/saes_v2)")
    p.add_argument("--mix", type=lambda t: _site_values(t, float), default=None,
                   help="corpus weights, e.g. prose=0.4,code=0.3,math=0.15,everyday=0.1,stories=0.05")
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--align-weight", type=float, default=0.0,
                   help="cross-layer term on the residual SAEs' decoder rows (0: off; see TrainConfig)")
    p.add_argument("--resample-every", type=int, default=TrainConfig.resample_every,
                   help="steps between dead-latent resamplings (0: never)")
    p.add_argument("--revive-dead", action="store_true",
                   help="with --init-from: train only the latents dead over the first --resample-every "
                        "steps, every other weight stays as saved (see TrainConfig)")
    p.add_argument("--revive-max-fires", type=int, default=0,
                   help="with --revive-dead: latents that fired at most this often in the window count as dead")
    p.add_argument("--revive-layers", type=lambda t: tuple(int(x) for x in t.split(",")), default=None,
                   help="with --revive-dead: comma list of layers to revive at (default: all)")
    p.add_argument("--drop-loops", action="store_true",
                   help="leave out generated everyday texts that fell into a loop (corpus.degenerate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: $FFP_CACHE/training/<hash>")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kw = {}
    if a.widths:
        kw["widths"] = a.widths
    if a.k:
        kw["k"] = a.k
    if a.mix:
        kw["mix"] = a.mix
    cfg = TrainConfig(preset=a.preset, init=a.init, batch_seqs=a.batch_seqs, lr=a.lr, enc_dtype=a.enc_dtype,
                      model_dtype=a.model_dtype, backend=a.backend, compile=not a.no_compile,
                      init_from=a.init_from, warmup_steps=a.warmup_steps, align_weight=a.align_weight,
                      max_tokens=a.max_tokens, max_minutes=a.max_minutes, seed=a.seed,
                      resample_every=a.resample_every, revive_dead=a.revive_dead,
                      revive_max_fires=a.revive_max_fires, revive_layers=a.revive_layers,
                      drop_loops=a.drop_loops, **kw)
    train(cfg, a.out, a.device, a.checkpoint_dir)


if __name__ == "__main__":
    main()
