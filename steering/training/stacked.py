"""The SAE math of the trainer: n TopK SAEs of one width stacked and stepped together.

Pure tensor functions (`fused_topk_step`, `alignment_penalty_grad`) and the `StackedTopK`
module that holds the weights; `steering.training.train` runs the loop around them (issue 16).
Shapes: n stacked SAEs (layers of one site), N tokens, d model width, w SAE width, k active.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BACKENDS = ("fused", "dense", "sparse")


def fused_topk_step(W_enc, b_enc, W_dec, b_dec, x, inv_scale, k: int, dt: torch.dtype):
    """One forward + backward of n stacked TopK SAEs' summed normalized MSE, as a pure function.

    Shapes: W_enc [n, d, w], b_enc [n, 1, w], W_dec [n, w, d], b_dec [n, 1, d] (float32 master
    weights); x [n, N, d] raw activations in any dtype (the model's bf16 on the CPU run);
    inv_scale [n, 1, 1] the per-SAE input scale 1/c (trainer's normalisation, module docstring).

    The same gradients as `StackedTopK.grad_step`'s dense backend (the encoder gets gradients
    only through the k active latents: the code matrix is zero elsewhere), written so that
    torch.compile can fuse every elementwise pass between the five batched matmuls and the
    top-k into a few loops: on the 2-core CPU these passes over [n, N, d] tensors, not the
    matmuls, dominated the eager step (scripts/bench_train.py). Matmuls run in ``dt``; the
    reconstruction error, the loss and the bias gradients in float32.

    Returns (grad W_enc, grad b_enc, grad W_dec, grad b_dec, x_hat [n, N, d] float32 in the
    scaled units, active values [n, N, k] (relu'd, unsorted), indices [n, N, k], nmse [n]).
    """
    n, N, d = x.shape
    w = W_dec.shape[1]
    xs = x.float() * inv_scale  # [n, N, d]
    xcb = (xs - b_dec).to(dt)  # [n, N, d]
    pre = torch.baddbmm(b_enc.to(dt), xcb, W_enc.to(dt))  # [n, N, w]
    vals, idx = pre.topk(k, dim=-1, sorted=False)  # [n, N, k]
    a = vals.relu()
    Wd = W_dec.to(dt)
    Z = torch.zeros_like(pre).scatter_(-1, idx, a)  # [n, N, w], zero outside the top-k
    x_hat = torch.bmm(Z, Wd).float() + b_dec  # [n, N, d]
    err = x_hat - xs
    var = (xs - xs.mean(1, keepdim=True)).pow(2).sum((1, 2))  # [n]
    nmse = err.pow(2).sum((1, 2)) / var
    g = err * (2 / var)[:, None, None]  # d loss / d x_hat  [n, N, d]
    gd = g.to(dt)
    gW_dec = torch.bmm(Z.transpose(1, 2), gd)  # [n, w, d]
    dpre = torch.bmm(gd, Wd.transpose(1, 2)).gather(-1, idx).float() * (vals > 0)  # [n, N, k]
    D = torch.zeros_like(pre).scatter_(-1, idx, dpre.to(dt))  # [n, N, w]
    gW_enc = torch.bmm(xcb.transpose(1, 2), D)  # [n, d, w]
    gb_enc = torch.zeros(n, w, device=x.device).scatter_add_(-1, idx.reshape(n, -1), dpre.reshape(n, -1))
    # sum_t d xc[t] = W_enc @ grad(b_enc): b_dec enters through the encoder input too.
    gb_dec = g.sum(1) - torch.bmm(W_enc, gb_enc[..., None])[..., 0]  # [n, d]
    return gW_enc.float(), gb_enc[:, None], gW_dec.float(), gb_dec[:, None], x_hat, a.float(), idx, nmse


@torch.no_grad()
def alignment_penalty_grad(W_dec: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-layer term ``weight * sum_l mean_i ||W_dec[l, i] - W_dec[l-1, i]||^2`` and its
    gradient. W_dec [n, w, d] (unit rows) -> (penalty scalar, grad [n, w, d])."""
    n, w, _ = W_dec.shape
    diff = W_dec[1:] - W_dec[:-1]  # [n-1, w, d]
    grad = torch.zeros_like(W_dec)
    grad[1:] += diff
    grad[:-1] -= diff
    return weight * diff.pow(2).sum() / w, grad.mul_(2 * weight / w)


_COMPILED: dict = {}


def run_fused_step(*args, compile: bool = True):
    """`fused_topk_step`, compiled once per process by torch.compile when ``compile`` (a dynamic
    token count, since sinks vary per batch, compiles once). Where inductor cannot compile (no
    C++ compiler, no Triton on a GPU image), the failure is logged once and every later step runs
    the same function eagerly."""
    if compile and not _COMPILED.get("failed"):
        if "fn" not in _COMPILED:  # wrap once: setdefault would build a new wrapper every step
            _COMPILED["fn"] = torch.compile(fused_topk_step, dynamic=True)
        try:
            return _COMPILED["fn"](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure; the eager path is the same math
            _COMPILED["failed"] = True
            log.warning("torch.compile of the fused SAE step failed (%s: %s); running it eagerly",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return fused_topk_step(*args)


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
    def init_from(self, x: torch.Tensor, gen: torch.Generator, shared: bool = False) -> None:
        """b_dec = input mean (bias from the data); random unit decoder rows; encoder = decoder^T
        (the TopK-SAE init of Gao et al. 2024). ``shared``: every stacked SAE starts from ONE
        random dictionary, so features of neighbouring layers start aligned (issue 16; the
        shared-initialisation counterpart of layer-wise transfer, Ghilardi et al. 2024)."""
        n, _, d = x.shape
        self.b_dec.copy_(x.mean(1, keepdim=True))
        shape = (1, *self.W_dec.shape[1:]) if shared else self.W_dec.shape
        rows = torch.randn(shape, generator=gen)
        self.W_dec.copy_((rows / rows.norm(dim=-1, keepdim=True)).expand_as(self.W_dec))
        self.W_enc.copy_(self.W_dec.transpose(1, 2))

    @torch.no_grad()
    def grad_step(self, x: torch.Tensor, enc_dtype: torch.dtype = torch.float32, backend: str = "sparse",
                  inv_scale: torch.Tensor | None = None, compile: bool = False):
        """Forward + backward of the summed normalized MSE, gradients written to ``.grad``.

        Only two things touch all w features: the dense encoder matmul (in ``enc_dtype``; bf16
        is ~2.5x faster on CPUs with AVX512-BF16, see docs/saes.md) and the top-k. Everything
        else runs on the k active latents as sparse CSR products (reconstruction, decoder and
        encoder gradients, and a sampled dense-dense product for d loss / d activation), all n
        SAEs in one block-diagonal sparse matrix (no Python loop over layers), so the
        encoder gets gradients only through the k active latents. The b_dec gradient needs
        sum_t dx_c[t] = W_enc @ grad(b_enc), a matrix-vector product instead of a sparse one.
        tests/test_training.py checks these gradients against dense autograd.

        ``backend="dense"`` computes the same gradients (still only through the k active latents:
        the code matrix is zero elsewhere) with dense batched matmuls in ``enc_dtype``
        (`fused_topk_step`, run eagerly); on the 2-core CPU with bf16 this is faster than the CSR
        kernels at these widths (docs/saes.md). ``backend="fused"`` is the same function compiled
        by torch.compile when ``compile``: the default of the training run.

        ``inv_scale`` [n, 1, 1]: the SAEs read ``x * inv_scale`` (x may then be the model's raw
        bf16 activations; the fused backend applies the scale inside its fused passes).

        Returns reconstruction [n, N, d] (in the scaled units), active values [n, N, k], indices
        [n, N, k] and the per-SAE normalized error [n].
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend in ("fused", "dense"):
            inv = inv_scale if inv_scale is not None else torch.ones(x.shape[0], 1, 1, device=x.device)
            out = run_fused_step(self.W_enc, self.b_enc, self.W_dec, self.b_dec, x, inv, self.k, enc_dtype,
                                 compile=compile and backend == "fused")
            # contiguous, with the parameters' layout: fused Adam reads a gradient by the parameter's
            # strides, and a transposed view was updated wrongly (found in session 13's review)
            self.W_enc.grad, self.b_enc.grad, self.W_dec.grad, self.b_dec.grad = (g.contiguous() for g in out[:4])
            return out[4:]
        x = x.float() if inv_scale is None else x.float() * inv_scale
        n, N, d = x.shape
        xc = x - self.b_dec  # [n, N, d]
        if enc_dtype == torch.float32:
            pre = torch.baddbmm(self.b_enc, xc, self.W_enc)  # [n, N, w]
        else:
            pre = torch.bmm(xc.to(enc_dtype), self.W_enc.to(enc_dtype)).add_(self.b_enc.to(enc_dtype))
        vals, idx = pre.topk(self.k, dim=-1)  # [n, N, k]
        vals = vals.float()
        del pre
        a = vals.relu()
        w = self.W_dec.shape[1]
        # One block-diagonal CSR matrix for all n SAEs: row (i, t), column (i, j).
        crow = torch.arange(0, n * N * self.k + 1, self.k, device=x.device)
        cols = (idx + torch.arange(n, device=x.device)[:, None, None] * w).reshape(-1)
        Z = torch.sparse_csr_tensor(crow, cols, a.reshape(-1), (n * N, n * w))
        W_dec = self.W_dec.reshape(n * w, d)
        x_hat = (torch.sparse.mm(Z, W_dec).view(n, N, d) + self.b_dec)
        err = x_hat - x  # [n, N, d]
        var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))  # [n]
        nmse = err.pow(2).sum((1, 2)) / var
        g = (2 * err / var[:, None, None]).reshape(n * N, d)  # d loss / d x_hat
        grads = {self.W_dec: (Z.t() @ g).view(n, w, d)}
        da = torch.sparse.sampled_addmm(Z, g, W_dec.T, beta=0.0).values()  # [n*N*k]
        dpre = da * (vals.reshape(-1) > 0)
        D = torch.sparse_csr_tensor(crow, cols, dpre, (n * N, n * w))
        grads[self.W_enc] = (D.t() @ xc.reshape(n * N, d)).view(n, w, d).transpose(1, 2)
        db_enc = torch.zeros(n * w, device=x.device).index_add_(0, cols, dpre).view(n, w)
        grads[self.b_enc] = db_enc[:, None, :]
        # sum_t dx_c[t] = W_enc @ grad(b_enc): a matrix-vector product per SAE.
        grads[self.b_dec] = (g.view(n, N, d).sum(1) - torch.bmm(self.W_enc, db_enc[..., None])[..., 0])[:, None, :]
        for p, gr in grads.items():
            p.grad = gr.contiguous()  # W_enc's is a transposed view: fused Adam needs its own layout
        return x_hat, a, idx, nmse

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
