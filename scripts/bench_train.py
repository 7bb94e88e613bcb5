"""Tokens/s of one SAE training step for all 90 default SAEs: the shipped trainer vs the current one.

    python scripts/bench_train.py [--old-ref 48d7769] [--repeats 3]

Both run in this one process on the same batches (8 x 128 tokens of random ids), alternating,
so the ratio is measured under the same machine load. A step is: model forward capturing every
site, then for each site the stacked SAE step and the Adam update. "old" is the StackedTopK of
git revision ``--old-ref`` (fp32 model forward, per-layer sparse CSR loop, widths 1536/512/512,
k = 32: the configuration that trained the v1 SAEs); "new" is the current trainer with its
default configuration (bf16 forward and dense bf16 step, widths and k from TrainConfig).
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


def old_module(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:steering/training/train.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_train.py"
    path.write_text(src.replace("from .. import", "from steering import").replace("from ..", "from steering.")
                    .replace("from . import corpus", "from steering.training import corpus"))
    spec = importlib.util.spec_from_file_location("old_train", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_train"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-ref", default="48d7769")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from steering.bundle import load_model
    from steering.presets import SITES, get_preset
    from steering.training import train as new

    old = old_module(a.old_ref)
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
    old_saes = {s: old.StackedTopK(L, d, old_w[s], 32) for s in SITES}
    new_saes = {s: new.StackedTopK(L, d, cfg.widths[s], cfg.k[s]) for s in SITES}
    for s in SITES:
        old_saes[s].init_from(acts32[s], torch.Generator().manual_seed(0))
        new_saes[s].init_from(acts32[s], torch.Generator().manual_seed(0), shared=True)
    same_saes = {s: new.StackedTopK(L, d, old_w[s], 32) for s in SITES}  # new code, the old widths and k
    for s in SITES:
        same_saes[s].init_from(acts32[s], torch.Generator().manual_seed(0), shared=True)
    old_opt = {s: torch.optim.Adam(old_saes[s].parameters()) for s in SITES}
    new_opt = {s: torch.optim.Adam(new_saes[s].parameters()) for s in SITES}
    same_opt = {s: torch.optim.Adam(same_saes[s].parameters()) for s in SITES}

    def step_old() -> int:
        acts = old._collect(m32, preset.arch, L, ids, dev)
        for s in SITES:
            old_saes[s].grad_step(acts[s])
            old_opt[s].step()
            old_saes[s].normalize_decoder()
        return acts["res"].shape[1]

    def stepper(saes, opts):
        def step() -> int:
            acts, keep = new.collect(m16, preset.arch, L, ids, dev)
            for s in SITES:
                saes[s].grad_step(acts[s], getattr(torch, cfg.enc_dtype), cfg.backend)
                opts[s].step()
                saes[s].normalize_decoder()
            return int(keep.sum())
        return step

    rates = {"old": [], "new": [], "new_old_widths": []}
    steps = (("old", step_old), ("new", stepper(new_saes, new_opt)), ("new_old_widths", stepper(same_saes, same_opt)))
    for _ in range(a.repeats + 1):  # the first round warms up
        for name, fn in steps:
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v[1:]) for k, v in rates.items()}
    print(f"tokens/s for one step of all 90 SAEs (model forward included), median of {a.repeats}:")
    print(f"  old ({a.old_ref}: fp32 forward, CSR loop, widths 1536/512/512, k 32): {med['old']:.0f}")
    print(f"  new (bf16 forward, dense bf16 step, widths {cfg.widths}, k {cfg.k}): {med['new']:.0f}")
    print(f"  new code (bf16 forward and step) at the old widths and k: {med['new_old_widths']:.0f}")
    print(f"  ratio new/old: {med['new'] / med['old']:.2f}; at the same widths and k (code, bf16 forward "
          f"and bf16 step together): {med['new_old_widths'] / med['old']:.2f}")


if __name__ == "__main__":
    main()
