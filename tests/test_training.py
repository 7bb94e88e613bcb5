"""SAE training math: sparse gradients equal dense autograd; saved SAEs read raw activations."""

import warnings

import pytest
import torch
from sae_lens import SAE

from steering.training.stacked import BACKENDS, StackedTopK, alignment_penalty_grad
from steering.training.train import TrainConfig, load_stacked, save_sae

warnings.filterwarnings("ignore", message="Sparse")


def _dense_reference(m: StackedTopK, x: torch.Tensor):
    pre = torch.baddbmm(m.b_enc, x - m.b_dec, m.W_enc)
    vals, idx = pre.topk(m.k, -1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = torch.baddbmm(m.b_dec, z, m.W_dec)
    var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    return x_hat, ((x_hat - x).pow(2).sum((1, 2)) / var).sum()


@pytest.mark.parametrize("seed,backend", [(s, b) for b in BACKENDS for s in (0, 1)])
def test_grad_step_equals_dense_autograd(seed, backend):
    torch.manual_seed(seed)
    m = StackedTopK(n=3, d=12, w=40, k=4)
    m.init_from(torch.randn(3, 50, 12), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.b_enc.normal_()
        m.W_enc.normal_()
        m.b_dec.normal_()
    x = torch.randn(3, 50, 12) * 3
    x_hat, vals, idx, nmse = m.grad_step(x, torch.float32, backend)
    sparse = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref_hat, loss = _dense_reference(m, x)
    loss.backward()
    torch.testing.assert_close(x_hat, ref_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nmse.sum(), loss.detach(), rtol=1e-4, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, rtol=1e-3, atol=1e-4, msg=f"gradient of {n}")
    assert (vals >= 0).all() and idx.shape == (3, 50, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inv_scale_equals_prescaled_input(backend):
    """The training loop passes raw activations and 1/c; the SAEs must see x / c."""
    torch.manual_seed(0)
    m = StackedTopK(n=2, d=12, w=40, k=4)
    x = torch.randn(2, 50, 12) * 5
    c = torch.tensor([2.0, 7.0])[:, None, None]
    m.init_from(x / c, torch.Generator().manual_seed(0))
    ref = [t.clone() for t in m.grad_step(x / c, torch.float32, backend)] + [p.grad.clone() for p in m.parameters()]
    got = list(m.grad_step(x, torch.float32, backend, inv_scale=1 / c)) + [p.grad.clone() for p in m.parameters()]
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), rtol=1e-4, atol=1e-5)


def test_compiled_fused_step_equals_eager():
    """torch.compile of the fused step (the CPU run's default) gives the eager gradients, bf16 inputs
    and a token count that changes between calls (sinks dropped) included."""
    torch.manual_seed(0)
    m = StackedTopK(n=3, d=16, w=64, k=6)
    m.init_from(torch.randn(3, 40, 16), torch.Generator().manual_seed(0))
    inv = torch.tensor([0.5, 1.0, 2.0])[:, None, None]
    for N in (40, 37):
        x = torch.randn(3, N, 16).bfloat16()
        eager = list(m.grad_step(x, torch.float32, "fused", inv_scale=inv)) + [p.grad.clone() for p in m.parameters()]
        comp = list(m.grad_step(x, torch.float32, "fused", inv_scale=inv, compile=True)) + [p.grad.clone() for p in m.parameters()]
        for e, c in zip(eager, comp):
            torch.testing.assert_close(c.float(), e.float(), rtol=1e-4, atol=1e-4)


def test_warm_start_reads_saved_weights(tmp_path):
    """`load_stacked` undoes the save's input-scale folding: a saved-then-loaded stack steps
    exactly like the original (fp16 storage aside)."""
    torch.manual_seed(0)
    m = StackedTopK(n=2, d=8, w=16, k=3)
    x = torch.randn(2, 30, 8)
    m.init_from(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_enc.normal_()
    c = [3.0, 0.5]
    for l in range(2):
        save_sae(tmp_path / "res" / f"layer_{l}", l, "res", m.W_enc[l], m.b_enc[l, 0] * c[l], m.W_dec[l],
                 m.b_dec[l, 0] * c[l], k=3, ref_scale=torch.ones(16), extra={"input_scale": c[l]})
    m2 = StackedTopK(n=2, d=8, w=16, k=3)
    scale = load_stacked(m2, tmp_path, "res")
    assert scale.flatten().tolist() == c
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=2e-3)
    with pytest.raises(ValueError, match="init_from"):
        load_stacked(StackedTopK(n=2, d=8, w=8, k=3), tmp_path, "res")  # narrower than saved
    with pytest.raises(ValueError, match="not an SAE"):
        load_stacked(m2, tmp_path, "mlp")

    # A wider run keeps the saved latents at their indices and adds unit-norm new ones,
    # shared by the layers, with zero bias and encoder columns as long as the saved ones' median
    # (a shorter column loses the top-k race to trained latents: session 12).
    wide = StackedTopK(n=2, d=8, w=24, k=3)
    load_stacked(wide, tmp_path, "res", torch.Generator().manual_seed(1))
    torch.testing.assert_close(wide.W_dec[:, :16], m.W_dec, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(wide.b_enc[:, :, :16], m.b_enc, rtol=1e-2, atol=2e-3)
    new = wide.W_dec[:, 16:]  # [2, 8, 8]
    torch.testing.assert_close(new.norm(dim=-1), torch.ones(2, 8))
    torch.testing.assert_close(new[0], new[1])
    assert (wide.b_enc[:, :, 16:] == 0).all()
    saved = m.W_enc.norm(dim=1).median(dim=1).values  # [2]
    torch.testing.assert_close(wide.W_enc[:, :, 16:].norm(dim=1), saved[:, None].expand(2, 8), rtol=1e-2, atol=2e-3)


def test_bf16_dense_step_close_to_float32():
    """The bf16 path the CPU run uses stays within bf16 rounding of the exact step."""
    torch.manual_seed(0)
    m = StackedTopK(n=2, d=16, w=64, k=4)
    x = torch.randn(2, 80, 16)
    m.init_from(x, torch.Generator().manual_seed(0))
    exact = [t.clone() for t in m.grad_step(x)[:1]] + [p.grad.clone() for p in m.parameters()]
    for backend in ("dense", "fused"):
        approx = [m.grad_step(x, torch.bfloat16, backend)[0]] + [p.grad.clone() for p in m.parameters()]
        for e, a in zip(exact, approx):
            assert float((e - a).norm() / e.norm()) < 0.1  # bf16 rounding; near-ties may pick other latents


def test_shared_init_gives_one_dictionary():
    m = StackedTopK(n=3, d=8, w=16, k=2)
    x = torch.randn(3, 20, 8) + torch.arange(3.0)[:, None, None]
    m.init_from(x, torch.Generator().manual_seed(0), shared=True)
    assert torch.equal(m.W_dec[0], m.W_dec[2]) and not torch.equal(m.b_dec[0], m.b_dec[2])
    m.init_from(x, torch.Generator().manual_seed(0), shared=False)
    assert not torch.equal(m.W_dec[0], m.W_dec[2])


def test_saved_sae_reads_raw_activations(tmp_path):
    """Training on x / c and folding c back at save gives an SAE on raw x (x_hat scales by c)."""
    torch.manual_seed(0)
    m = StackedTopK(n=1, d=8, w=16, k=3)
    m.init_from(torch.randn(1, 20, 8), torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_enc.normal_()
        m.b_dec.normal_()
    c = 7.5
    x = torch.randn(1, 20, 8) * c
    with torch.no_grad():
        x_hat_scaled = m.grad_step(x / c)[0]
    save_sae(tmp_path, 4, "mlp", m.W_enc[0], m.b_enc[0, 0] * c, m.W_dec[0], m.b_dec[0, 0] * c, k=3,
             ref_scale=torch.ones(16), extra={"input_scale": c})
    sae = SAE.load_from_disk(str(tmp_path))
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_mlp_out"
    out = sae(x[0].to(sae.W_dec.dtype)).float()
    torch.testing.assert_close(out, c * x_hat_scaled[0], rtol=2e-2, atol=5e-2)  # fp16 storage


def test_evaluate_report_fields(tiny_bundle):
    from steering.training.evaluate import evaluate, markdown_table
    rep = evaluate(tiny_bundle, dead_tokens=1024, fit_tokens=512, ce_tokens=256, batch=4)
    assert len(rep["saes"]) == 9
    r = rep["saes"]["1/res"]
    assert r["l0"] == 8.0  # TopK k=8
    assert 0.0 <= r["dead"] <= 1.0 and r["fve"] < 1.0
    assert "| 1/res | 128 |" in markdown_table(rep)


def test_alignment_penalty_gradient_equals_autograd():
    torch.manual_seed(0)
    W = torch.randn(4, 10, 6)
    W = W / W.norm(dim=-1, keepdim=True)
    value, grad = alignment_penalty_grad(W, 0.3)
    Wr = W.clone().requires_grad_(True)
    ref = 0.3 * sum(((Wr[l] - Wr[l - 1]) ** 2).sum(-1).mean() for l in range(1, 4))
    ref.backward()
    torch.testing.assert_close(value, ref.detach())
    torch.testing.assert_close(grad, Wr.grad)
    same = W[:1].expand(4, 10, 6)
    assert float(alignment_penalty_grad(same, 0.3)[0]) == 0.0  # one shared dictionary costs nothing


def test_compile_failure_falls_back_to_the_eager_step(monkeypatch, caplog):
    """A machine where inductor cannot compile (e.g. a GPU image without Triton) still trains:
    the failure is logged once and the same step runs eagerly."""
    from steering.training import stacked as T

    def broken(*_a, **_k):
        def fn(*_args):
            raise RuntimeError("no compiler here")
        return fn

    monkeypatch.setattr(T, "_COMPILED", {})
    monkeypatch.setattr(T.torch, "compile", broken)
    torch.manual_seed(0)
    m = StackedTopK(n=2, d=8, w=16, k=3)
    x = torch.randn(2, 20, 8)
    m.init_from(x, torch.Generator().manual_seed(0))
    eager = [t.clone() for t in m.grad_step(x, torch.float32, "fused")]
    with caplog.at_level("WARNING"):
        got = m.grad_step(x, torch.float32, "fused", compile=True)
        m.grad_step(x, torch.float32, "fused", compile=True)
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e)
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1


def _fake_sae(folder, d_in: int, width: int, trained_tokens: int, seed: int) -> dict:
    """A saved SAE folder written by the trainer's own `save_sae`; returns its stored tensors."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    save_sae(folder, 0, "res", torch.randn(d_in, width, generator=g), torch.randn(width, generator=g),
             torch.randn(width, d_in, generator=g), torch.randn(d_in, generator=g), k=2,
             ref_scale=torch.rand(width, generator=g) + 0.5,
             extra={"trained_tokens": trained_tokens, "init": "shared"})
    return load_file(folder / "sae_weights.safetensors")


def test_merge_keep_latents_drops_only_the_added_latents(tmp_path, monkeypatch):
    """scripts/merge_continued_saes.py --keep-latents: the shipped SAE holds latents 0..N-1 of the
    run unchanged (weights and reference scales), says what was dropped, loads in sae-lens, and
    refuses to drop latents the SAEs had before the run."""
    import json
    import runpy
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).resolve().parent.parent / "scripts" / "merge_continued_saes.py")
    dst, src = tmp_path / "dst", tmp_path / "run"
    _fake_sae(dst / "res" / "layer_0", 4, 6, 1000, 0)
    (dst / "train_config.json").write_text(json.dumps({"res_continued": {"tokens_seen": 1}}))
    run_w = _fake_sae(src / "res" / "layer_0", 4, 8, 0, 1)
    (src / "train_config.json").write_text(json.dumps({"tokens_seen": 500, "config": {"align_weight": 0.03}}))
    monkeypatch.setattr(sys, "argv", ["merge", "--src", str(src), "--dst", str(dst), "--site", "res",
                                      "--base-commit", "abc123", "--keep-latents", "6"])
    runpy.run_path(script, run_name="__main__")
    got = load_file(dst / "res" / "layer_0" / "sae_weights.safetensors")
    assert torch.equal(got["W_enc"], run_w["W_enc"][:, :6]) and torch.equal(got["W_dec"], run_w["W_dec"][:6])
    assert torch.equal(got["b_enc"], run_w["b_enc"][:6]) and torch.equal(got["b_dec"], run_w["b_dec"])
    assert load_file(dst / "res" / "layer_0" / "ref_scale.safetensors")["ref_scale"].shape == (6,)
    cfg = json.loads((dst / "res" / "layer_0" / "cfg.json").read_text())
    assert cfg["d_sae"] == 6 and "latents 6-7" in cfg["metadata"]["dropped"] and "widened" not in cfg["metadata"]
    assert cfg["metadata"]["trained_tokens"] == 1500 and cfg["metadata"]["continued_tokens"] == 500
    tc = json.loads((dst / "train_config.json").read_text())
    assert tc["res_continued"]["keep_latents"] == 6 and tc["res_continued_earlier"] == [{"tokens_seen": 1}]
    sae = SAE.load_from_disk(str(dst / "res" / "layer_0"))
    assert sae.encode(torch.randn(3, 4).half()).shape == (3, 6)
    # the run's SAEs are now 6 wide before it: keeping 5 would drop one of them
    monkeypatch.setattr(sys, "argv", ["merge", "--src", str(src), "--dst", str(dst), "--site", "res",
                                      "--base-commit", "abc123", "--keep-latents", "5"])
    with pytest.raises(ValueError, match="--keep-latents 5"):
        runpy.run_path(script, run_name="__main__")


def test_resampled_latent_can_win_the_top_k():
    """A dead latent resampled into a trained TopK SAE (encoder columns much longer than 0.2) gets
    an encoder column as long as the live ones' median, so it enters the top-k on the input it
    was pointed at; with the former fixed 0.2 it lost to the trained latents and stayed dead."""
    from steering.training.train import _resample

    torch.manual_seed(0)
    n, d, w, k, N = 1, 16, 24, 4, 64
    m = StackedTopK(n=n, d=d, w=w, k=k)
    dirs = torch.nn.functional.normalize(torch.randn(w, d), dim=-1)
    with torch.no_grad():
        m.W_dec[0] = dirs
        m.W_enc[0] = 3.0 * dirs.T  # trained: columns of norm 3
    x = torch.randn(n, N, d) * 4
    x_hat = torch.zeros_like(x)  # every input badly reconstructed
    fired = torch.ones(n, w)
    fired[0, -3:] = 0  # the last three latents are dead
    opt = torch.optim.Adam(m.parameters())
    _resample(m, opt, fired, x, x_hat, torch.Generator().manual_seed(1))
    norms = m.W_enc[0].norm(dim=0)
    assert torch.allclose(norms[-3:], torch.full((3,), 3.0), atol=1e-4)
    # each resampled latent points at one input; on that input it now ranks in the top-k
    with torch.no_grad():
        pre = (x[0] - m.b_dec[0]) @ m.W_enc[0] + m.b_enc[0]  # [N, w]
        target = [int(((x[0] / x[0].norm(dim=-1, keepdim=True)) @ m.W_dec[0, j]).argmax()) for j in (21, 22, 23)]
        top = pre.topk(k, dim=-1).indices  # [N, k]
    assert all(j in top[t].tolist() for j, t in zip((21, 22, 23), target))
    with torch.no_grad():  # the same latents at the former 0.2 scale: out of the top-k on those inputs
        m.W_enc[0][:, -3:] *= 0.2 / 3.0
        top02 = ((x[0] - m.b_dec[0]) @ m.W_enc[0] + m.b_enc[0]).topk(k, dim=-1).indices
    assert not any(j in top02[t].tolist() for j, t in zip((21, 22, 23), target))


def test_revive_dead_moves_only_the_revived_latents():
    """`freeze_latents` (TrainConfig.revive_dead): after Adam steps on a full gradient, every latent
    outside the trainable mask and b_dec hold their values exactly; the trainable ones move."""
    from steering.training.train import freeze_latents

    torch.manual_seed(0)
    m = StackedTopK(n=2, d=8, w=16, k=4)
    x = torch.randn(2, 40, 8)
    m.init_from(x, torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = torch.zeros(2, 16, dtype=torch.bool)
    trainable[0, [1, 5]] = True
    trainable[1, 9] = True
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        m.grad_step(x, torch.float32, "dense")
        assert m.W_enc.grad.abs().sum() > 0
        freeze_latents(m, trainable)
        opt.step()
    frozen = ~trainable
    assert torch.equal(m.W_enc.transpose(1, 2)[frozen], before["W_enc"].transpose(1, 2)[frozen])
    assert torch.equal(m.b_enc[:, 0][frozen], before["b_enc"][:, 0][frozen])
    assert torch.equal(m.W_dec[frozen], before["W_dec"][frozen])
    assert torch.equal(m.b_dec, before["b_dec"])
    moved = (m.W_dec[trainable] - before["W_dec"][trainable]).norm(dim=-1)  # [3]
    assert (moved > 0).all()
    with pytest.raises(ValueError, match="revive_dead needs init_from"):
        TrainConfig(revive_dead=True)


def test_merge_revived_only_copies_the_revived_latents(tmp_path, monkeypatch):
    """scripts/merge_continued_saes.py --revived-only: the revived latents' encoder columns, biases,
    decoder rows and reference scales come from the run; every other value stays as shipped."""
    import json
    import runpy
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).resolve().parent.parent / "scripts" / "merge_continued_saes.py")
    dst, src = tmp_path / "dst", tmp_path / "run"
    base = _fake_sae(dst / "mlp" / "layer_0", 4, 6, 1000, 0)
    base_ref = load_file(dst / "mlp" / "layer_0" / "ref_scale.safetensors")["ref_scale"]
    (dst / "train_config.json").write_text(json.dumps({}))
    other = _fake_sae(tmp_path / "other", 4, 6, 0, 1)  # the run: latents 2 and 4 new, the others the base's
    rev, keep = [2, 4], [0, 1, 3, 5]
    run_w = {k: v.float().clone() for k, v in base.items()}
    run_w["W_enc"][:, rev] = other["W_enc"][:, rev].float()
    run_w["b_enc"][rev], run_w["W_dec"][rev] = other["b_enc"][rev].float(), other["W_dec"][rev].float()
    run_ref = torch.rand(6) + 0.5
    save_sae(src / "mlp" / "layer_0", 0, "mlp", run_w["W_enc"], run_w["b_enc"], run_w["W_dec"], run_w["b_dec"], k=2,
             ref_scale=run_ref, extra={"trained_tokens": 500, "init": "shared"})
    run_w = load_file(src / "mlp" / "layer_0" / "sae_weights.safetensors")
    (src / "train_config.json").write_text(json.dumps({"tokens_seen": 500, "revived": {"mlp": [rev]},
                                                       "config": {"align_weight": 0.0}}))
    argv = ["merge", "--src", str(src), "--dst", str(dst), "--site", "mlp", "--base-commit", "abc123", "--revived-only"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(script, run_name="__main__")
    got = load_file(dst / "mlp" / "layer_0" / "sae_weights.safetensors")
    ref = load_file(dst / "mlp" / "layer_0" / "ref_scale.safetensors")["ref_scale"]
    assert torch.equal(got["W_enc"][:, rev], run_w["W_enc"][:, rev]) and torch.equal(got["W_dec"][rev], run_w["W_dec"][rev])
    assert torch.equal(got["b_enc"][rev], run_w["b_enc"][rev]) and torch.equal(ref[rev], run_ref[rev])
    assert torch.equal(got["W_enc"][:, keep], base["W_enc"][:, keep]) and torch.equal(got["W_dec"][keep], base["W_dec"][keep])
    assert torch.equal(got["b_enc"][keep], base["b_enc"][keep]) and torch.equal(ref[keep], base_ref[keep])
    assert torch.equal(got["b_dec"], base["b_dec"])
    md = json.loads((dst / "mlp" / "layer_0" / "cfg.json").read_text())["metadata"]
    assert md["trained_tokens"] == 1000 and "2 latents dead" in md["revived"]
    assert json.loads((dst / "train_config.json").read_text())["mlp_revived"]["base_commit"] == "abc123"
    assert SAE.load_from_disk(str(dst / "mlp" / "layer_0")).encode(torch.randn(3, 4).half()).shape == (3, 6)
    # a run whose other latents are not the shipped ones (it started elsewhere, or trained them) is refused
    _fake_sae(src / "mlp" / "layer_0", 4, 6, 0, 2)
    with pytest.raises(ValueError, match="did not revive differs"):
        runpy.run_path(script, run_name="__main__")


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_fused_adam_steps_like_plain_adam_on_every_backend(backend):
    """The trainer's fused Adam reads gradients with the parameters' layout: every backend hands it
    contiguous ones (the sparse backend's W_enc gradient was a transposed view, and fused Adam
    moved the weights wrongly)."""
    torch.manual_seed(0)
    ms = [StackedTopK(n=2, d=8, w=16, k=4) for _ in range(2)]
    x = torch.randn(2, 40, 8)
    for m in ms:
        m.init_from(x, torch.Generator().manual_seed(0))
    opts = [torch.optim.Adam(ms[0].parameters(), lr=1e-2, fused=True), torch.optim.Adam(ms[1].parameters(), lr=1e-2)]
    for m, opt in zip(ms, opts):
        for _ in range(3):
            m.grad_step(x, torch.float32, backend)
            opt.step()
    for a, b in zip(ms[0].parameters(), ms[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_revive_dead_run_trains_only_the_dead_latents(tiny_llama_preset, tmp_path):
    """`train` with ``revive_dead`` on a tiny model: latents made dead in a saved SAE (a very
    negative encoder bias) are found in the first window, resampled and trained; every other
    saved weight comes back unchanged; the merge's input is what `merge_continued_saes.py
    --revived-only` expects; a run too short to close the window raises."""
    from safetensors.torch import load_file, save_file

    from steering.training.train import train

    common = dict(preset=str(tiny_llama_preset), widths={"mlp": 32}, k={"mlp": 4}, mix={"everyday": 1.0}, ctx=32,
                  batch_seqs=4, backend="dense", compile=False, enc_dtype="float32", model_dtype="float32",
                  warmup_steps=1)
    base = tmp_path / "base"
    train(TrainConfig(**common, max_tokens=600, resample_every=0), base, "cpu", tmp_path / "ck0")
    n_layers = len(list((base / "mlp").iterdir()))
    for l in range(n_layers):  # latents 0-4 can never enter the top k
        f = base / "mlp" / f"layer_{l}" / "sae_weights.safetensors"
        w = load_file(f)
        w["b_enc"][:5] = -1e4
        save_file(w, f)
    out = tmp_path / "revived"
    tc = train(TrainConfig(**common, init_from=str(base), revive_dead=True, resample_every=3, max_tokens=2500),
               out, "cpu", tmp_path / "ck1")
    assert tc["steps"] > 4 and len(tc["revived"]["mlp"]) == n_layers
    for l, rev in enumerate(tc["revived"]["mlp"]):
        assert set(range(5)) <= set(rev) and len(rev) < 32
        a = load_file(out / "mlp" / f"layer_{l}" / "sae_weights.safetensors")
        b = load_file(base / "mlp" / f"layer_{l}" / "sae_weights.safetensors")
        keep = torch.ones(32, dtype=torch.bool)
        keep[rev] = False
        assert torch.equal(a["W_enc"][:, keep], b["W_enc"][:, keep]) and torch.equal(a["W_dec"][keep], b["W_dec"][keep])
        assert torch.equal(a["b_enc"][keep], b["b_enc"][keep]) and torch.equal(a["b_dec"], b["b_dec"])
        assert (a["b_enc"][:5] > -100).all()  # resampled (bias 0), then trained
        assert not torch.equal(a["W_dec"][rev], b["W_dec"][rev])
    with pytest.raises(RuntimeError, match="before step 50"):
        train(TrainConfig(**common, init_from=str(base), revive_dead=True, resample_every=50, max_tokens=300),
              tmp_path / "short", "cpu", tmp_path / "ck2")


def test_revive_mask_counts_rare_latents_and_limits_layers():
    """`revive_mask`: latents that fired at most ``max_fires`` times, only at ``layers``."""
    from steering.training.train import revive_mask

    fired = torch.tensor([[0.0, 1, 3, 9], [0, 2, 5, 0], [4, 0, 1, 7]])  # [L=3, w=4]
    assert revive_mask(fired).tolist() == [[True, False, False, False], [True, False, False, True],
                                           [False, True, False, False]]
    assert revive_mask(fired, 3, (0, 2)).tolist() == [[True, True, True, False], [False] * 4,
                                                      [False, True, True, False]]
    with pytest.raises(ValueError, match=r"revive_layers \[3\] out of range 0..2"):
        revive_mask(fired, 0, (3,))
    with pytest.raises(ValueError, match="need revive_dead"):
        TrainConfig(revive_max_fires=2)
    with pytest.raises(ValueError, match="revive_max_fires must be >= 0"):
        TrainConfig(init_from="x", revive_dead=True, revive_max_fires=-1)
    with pytest.raises(ValueError, match="revive_layers is empty"):
        TrainConfig(init_from="x", revive_dead=True, revive_layers=())
    base = TrainConfig(init_from="x", revive_dead=True)
    assert base.key() != TrainConfig(init_from="x", revive_dead=True, revive_max_fires=2).key()
    assert base.key() != TrainConfig(init_from="x", revive_dead=True, revive_layers=(29,)).key()


def test_revive_rare_latents_at_one_layer(tiny_llama_preset, tmp_path, monkeypatch):
    """``revive_max_fires`` / ``revive_layers`` in a run: at the window's end every latent to revive
    is resampled, the ones that fired a few times included (not only the never-fired ones); the
    other layers come back byte for byte."""
    from safetensors.torch import load_file

    from steering.training import train as train_mod

    common = dict(preset=str(tiny_llama_preset), widths={"mlp": 32}, k={"mlp": 4}, mix={"everyday": 1.0}, ctx=32,
                  batch_seqs=4, backend="dense", compile=False, enc_dtype="float32", model_dtype="float32",
                  warmup_steps=1)
    base = tmp_path / "base"
    train_mod.train(TrainConfig(**common, max_tokens=600, resample_every=0), base, "cpu", tmp_path / "ck0")
    n_layers = len(list((base / "mlp").iterdir()))
    seen = []
    real = train_mod._resample

    def spy(sae, opt, dead, *rest):
        seen.append(dead.clone())
        return real(sae, opt, dead, *rest)

    monkeypatch.setattr(train_mod, "_resample", spy)
    with pytest.raises(ValueError, match=r"revive_layers \[99\] out of range"):  # before any step runs
        train_mod.train(TrainConfig(**common, init_from=str(base), revive_dead=True, resample_every=3,
                                    revive_layers=(99,), max_tokens=1500), tmp_path / "bad", "cpu", tmp_path / "ck9")
    assert not seen
    out = tmp_path / "revived"
    tc = train_mod.train(TrainConfig(**common, init_from=str(base), revive_dead=True, resample_every=3,
                                     revive_max_fires=10**6, revive_layers=(0,), max_tokens=1500),
                         out, "cpu", tmp_path / "ck1")
    rev = tc["revived"]["mlp"]
    assert len(rev[0]) == 32 and all(r == [] for r in rev[1:])  # every latent at layer 0 counts as rare
    assert torch.equal(seen[0][0], torch.zeros(32)) and (seen[0][1:] == 1).all()  # all of layer 0 resampled
    for l in range(1, n_layers):
        a = load_file(out / "mlp" / f"layer_{l}" / "sae_weights.safetensors")
        b = load_file(base / "mlp" / f"layer_{l}" / "sae_weights.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))


def test_degenerate_texts_are_the_generators_loops():
    """`corpus.degenerate`: loops and emoji runs out, ordinary prose (repeated words apart) in."""
    from steering.training.corpus import degenerate

    assert degenerate("we will talk about tomorrow, tomorrow, tomorrow, tomorrow and then")
    assert degenerate("🌈🌆🌈🌈🌈🌈🌈🌊🌊 hi")
    assert degenerate("Love, no thanks, just a lonely friend. " * 6)  # a phrase looped: distinct-2 low
    assert not degenerate("No, no, no. She said it twice, then laughed: very, very funny indeed.")
    assert not degenerate("The bride and groom cut the wedding cake while the band played on.")
    assert not degenerate("short")


def test_catalog_text_drops_everyday_loops(monkeypatch):
    """The catalog's default text leaves out everyday texts that `degenerate` flags (their repeated
    tokens were the top context of 1,419 residual features) and keeps the other domains whole."""
    from steering.catalog import build
    from steering.training import corpus

    docs = {"everyday": ["A calm day at the lake with my sister and her dog, who chased every duck she saw "
                         "until the sun went down and we walked home tired and happy.",
                         "see you tomorrow tomorrow tomorrow tomorrow tomorrow, " * 3],
            "code": ["x = [0, 0, 0, 0, 0]\nprint(x)\n" * 4]}
    monkeypatch.setattr(corpus, "DOMAINS", tuple(docs))
    monkeypatch.setattr(corpus, "sample_texts", lambda d, n, seed=0, split="all", min_chars=100: list(docs[d]))
    seen = {}

    class Tok:
        eos_token_id, bos_token_id = 0, None

        def __call__(self, text, **kw):
            ids = [1 + hash(w) % 50 for w in text.split()]
            seen[text] = True
            return {"input_ids": ids}

    build.corpus_sequences(Tok(), 10_000, ctx=16, seed=0, mix={"everyday": 0.5, "code": 0.5})
    assert any("lake" in t for t in seen) and any("[0, 0, 0" in t for t in seen)
    assert not any("tomorrow tomorrow" in t for t in seen)


def test_merge_revived_leaves_layers_without_revived_latents_alone(tmp_path, monkeypatch):
    """A --revive-layers run lists [] for the other layers: their files stay byte for byte; the note
    of a layer with revived latents says they were rare (fired at most N times), not dead."""
    import json
    import runpy
    import shutil
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "scripts" / "merge_continued_saes.py")
    dst, src = tmp_path / "dst", tmp_path / "run"
    for l in (0, 1):
        _fake_sae(dst / "mlp" / f"layer_{l}", 4, 6, 1000, l)
        (src / "mlp").mkdir(parents=True, exist_ok=True)
    (dst / "train_config.json").write_text(json.dumps({}))
    before = {f: f.read_bytes() for f in (dst / "mlp" / "layer_0").iterdir()}
    shutil.copytree(dst / "mlp" / "layer_1", src / "mlp" / "layer_1")
    (src / "train_config.json").write_text(json.dumps({"tokens_seen": 500, "revived": {"mlp": [[], [1]]},
                                                       "config": {"revive_max_fires": 5}}))
    monkeypatch.setattr(sys, "argv", ["merge", "--src", str(src), "--dst", str(dst), "--site", "mlp",
                                      "--base-commit", "abc123", "--revived-only"])
    runpy.run_path(script, run_name="__main__")
    assert {f: f.read_bytes() for f in (dst / "mlp" / "layer_0").iterdir()} == before
    md = json.loads((dst / "mlp" / "layer_1" / "cfg.json").read_text())["metadata"]
    assert "1 latents fired at most 5 times over the run's first window" in md["revived"]


def test_training_text_can_drop_everyday_loops(monkeypatch):
    """`--drop-loops` (session 15): the trainer's stream leaves out everyday texts that `degenerate`
    flags, as the catalog does; other domains stay whole; the option is part of the run's key."""
    from steering.training import corpus
    from steering.training.train import TokenStream, TrainConfig

    docs = {"everyday": ["A calm day at the lake with my sister and her dog, who chased every duck she saw until "
                         "the sun went down and we walked home tired and happy.",
                         "see you tomorrow tomorrow tomorrow tomorrow tomorrow, " * 3],
            "code": ["x = [0, 0, 0, 0, 0]\nprint(x)\n" * 4]}
    monkeypatch.setattr(corpus, "load_domain", lambda d, split="train": list(docs[d]))

    class Tok:
        eos_token_id = 0

        def __call__(self, text, **kw):
            return {"input_ids": [1 + len(w) for w in text.split()]}

    mix = {"everyday": 0.5, "code": 0.5}
    kept, full = TokenStream(Tok(), mix, 8, 0, drop_loops=True), TokenStream(Tok(), mix, 8, 0)
    n_loop = len(docs["everyday"][1].split()) + 1  # its tokens and the eos
    assert full.token_counts["everyday"] - kept.token_counts["everyday"] == n_loop
    assert full.token_counts["code"] == kept.token_counts["code"]
    assert TrainConfig().key() != TrainConfig(drop_loops=True).key()
