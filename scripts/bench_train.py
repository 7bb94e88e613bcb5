"""Tokens/s of one SAE training step for all 90 default SAEs: the shipped trainer vs the current one.

    python scripts/bench_train.py [--old-ref 48d7769] [--repeats 3]

Both run in this one process on the same batches (8 x 128 tokens of random ids), alternating,
so the ratio is measured under the same machine load. A step is: model forward capturing every
site, then for each site the stacked SAE step and the Adam update. "old" is the StackedTopK of
git revision ``--old-ref`` (fp32 model forward, per-layer sparse CSR loop, widths 1536/512/512,
k = 32: the configuration that trained the v1 SAEs); "v2" is the trainer of the shipped v2 SAEs
(``--v2-ref``: bf16 forward, eager dense bf16 step, plain Adam); "new" is the current trainer with
its default configuration (bf16 forward kept in bf16, the fused step compiled by torch.compile,
fused Adam; widths and k from TrainConfig).
Prints medians and the ratio; asserts nothing (timings are noisy: docs/saes.md quotes a run).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Sparse")


def old_module(ref: str, name: str = "old_train"):
    src = subprocess.run(["git", "show", f"{ref}:steering/training/train.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src.replace("from .. import", "from steering import").replace("from ..", "from steering.")
                    .replace("from . import corpus", "from steering.training import corpus"))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-ref", default="48d7769", help="the v1 trainer")
    p.add_argument("--v2-ref", default="58b3835", help="the trainer that trained the shipped v2 SAEs")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from steering.bundle import load_model
    from steering.presets import SITES, get_preset
    from steering.training import train as new

    old = old_module(a.old_ref)
    v2 = old_module(a.v2_ref, "v2_train")
    preset = get_preset("default")
    dev = torch.device("cpu")
    m32, _ = load_model(preset, dev, torch.float32)
    m16, _ = load_model(preset, dev, torch.bfloat16)
    cfg = new.TrainConfig()
    L, d = preset.n_layers, preset.d_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 40000, (8, 128), generator=g)
    old_w = {"res": 1536, "mlp": 512, "attn": 512}
    acts32 = old._collect(m32, preset.arch, L, ids, dev)

    def make(mod, widths, k, shared=True, **adam):
        saes = {s: mod.StackedTopK(L, d, widths[s], k[s]) for s in SITES}
        for s in SITES:
            if shared:
                saes[s].init_from(acts32[s], torch.Generator().manual_seed(0), shared=True)
            else:
                saes[s].init_from(acts32[s], torch.Generator().manual_seed(0))
        return saes, {s: torch.optim.Adam(saes[s].parameters(), **adam) for s in SITES}

    old_saes, old_opt = make(old, old_w, {s: 32 for s in SITES}, shared=False)
    v2_saes, v2_opt = make(v2, cfg.widths, cfg.k)
    new_saes, new_opt = make(new, cfg.widths, cfg.k, fused=True)
    same_saes, same_opt = make(new, old_w, {s: 32 for s in SITES}, fused=True)  # new code, v1 widths and k
    ones = {s: torch.ones(L, 1, 1) for s in SITES}

    def step_old() -> int:
        acts = old._collect(m32, preset.arch, L, ids, dev)
        for s in SITES:
            old_saes[s].grad_step(acts[s])
            old_opt[s].step()
            old_saes[s].normalize_decoder()
        return acts["res"].shape[1]

    def step_v2() -> int:
        acts, keep = v2.collect(m16, preset.arch, L, ids, dev)
        for s in SITES:
            v2_saes[s].grad_step(acts[s], torch.bfloat16, "dense")
            v2_opt[s].step()
            v2_saes[s].normalize_decoder()
        return int(keep.sum())

    def stepper(saes, opts):
        def step() -> int:
            acts, keep = new.collect(m16, preset.arch, L, ids, dev, dtype=None)
            for s in SITES:
                saes[s].grad_step(acts[s], getattr(torch, cfg.enc_dtype), cfg.backend, inv_scale=ones[s],
                                  compile=cfg.compile)
                opts[s].step()
                saes[s].normalize_decoder()
            return int(keep.sum())
        return step

    rates = {"old": [], "v2": [], "new": [], "new_old_widths": []}
    steps = (("old", step_old), ("v2", step_v2), ("new", stepper(new_saes, new_opt)),
             ("new_old_widths", stepper(same_saes, same_opt)))
    for _ in range(a.repeats + 1):  # the first round warms up (and compiles the fused step)
        for name, fn in steps:
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v[1:]) for k, v in rates.items()}
    print(f"tokens/s for one step of all 90 SAEs (model forward included), median of {a.repeats}:")
    print(f"  old ({a.old_ref}: fp32 forward, CSR loop, widths 1536/512/512, k 32): {med['old']:.0f}")
    print(f"  v2 trainer ({a.v2_ref}: bf16 forward, eager dense bf16 step, Adam): {med['v2']:.0f}")
    print(f"  new (bf16 forward, compiled fused step, fused Adam, widths {cfg.widths}, k {cfg.k}): {med['new']:.0f}")
    print(f"  new code at the old widths and k: {med['new_old_widths']:.0f}")
    print(f"  ratio new/old: {med['new'] / med['old']:.2f}; new/v2: {med['new'] / med['v2']:.2f}; "
          f"at the old widths and k, new/old: {med['new_old_widths'] / med['old']:.2f}")


if __name__ == "__main__":
    main()
