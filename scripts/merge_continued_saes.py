"""Copy one site's SAEs from a continued training run over the shipped ones, with their provenance.

    python scripts/merge_continued_saes.py --src /tmp/res --site res --base-commit b840da2

Session 9 continued the residual SAEs of assets/saes_v2 (`steering.training.train --init-from
assets/saes_v2 --widths res=1024 ...`) and shipped only that site. This copies the weights and
reference scales, and writes into each cfg.json's metadata what the run's own cfg.json cannot know:
the tokens before the continuation (``trained_tokens`` becomes the total, ``continued_tokens`` the
run's), the commit it continued from, its k and width before (a wider run keeps the saved latents
at their indices, ``widened``), and the cross-layer term's weight (``align_weight``, read
from the run's train_config.json). The run's settings go into assets/saes_v2/train_config.json as
``<site>_continued``.

``--keep-latents N`` keeps only latents 0..N-1 of a widened run (session 12: the residual SAEs were
continued 1,152 wide, and most of the 128 latents added at the start of that run never fired on
held-out text; dropping them cost at most 0.006 FVE, so the shipped SAEs stay 1,024 wide). The
encoder columns, biases, decoder rows and reference scales of the kept latents are copied
unchanged; TopK then picks its k among the kept latents.

``--revived-only`` merges a ``--revive-dead`` run (session 13: the MLP SAEs' dead latents): only
the latents the run lists as revived (its train_config.json ``revived``) are copied, their encoder
columns, encoder biases, decoder rows and reference scales; every other value of the shipped file,
b_dec included, stays byte for byte, and ``trained_tokens`` is not changed (the other latents did
not train).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

log = logging.getLogger("merge_continued_saes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, required=True, help="the run's --out folder")
    p.add_argument("--dst", type=Path, default=Path("assets/saes_v2"))
    p.add_argument("--site", default="res")
    p.add_argument("--base-commit", required=True, help="commit of the SAEs the run continued from")
    p.add_argument("--keep-latents", type=int, default=0,
                   help="keep latents 0..N-1 only (drop the ones a widened run added); 0: keep all")
    p.add_argument("--revived-only", action="store_true",
                   help="copy only the latents a --revive-dead run trained; everything else stays")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    run = json.loads((a.src / "train_config.json").read_text())
    if a.revived_only:
        merge_revived(a, run)
        return
    cfg0 = json.loads((a.dst / a.site / "layer_0" / "cfg.json").read_text())
    before = cfg0["metadata"]["trained_tokens"]
    k_before, w_before = cfg0["k"], cfg0["d_sae"]
    layers = sorted((a.src / a.site).iterdir())
    for layer in layers:
        cfg = json.loads((layer / "cfg.json").read_text())
        md = cfg["metadata"]
        out = a.dst / a.site / layer.name
        if a.keep_latents and a.keep_latents < cfg["d_sae"]:
            if a.keep_latents < w_before:
                raise ValueError(f"--keep-latents {a.keep_latents} would drop latents the continued SAEs had "
                                 f"before the run (width {w_before})")
            n, trained_width = a.keep_latents, cfg["d_sae"]
            w = load_file(layer / "sae_weights.safetensors")
            save_file({"W_enc": w["W_enc"][:, :n].contiguous(), "b_enc": w["b_enc"][:n].contiguous(),
                       "W_dec": w["W_dec"][:n].contiguous(), "b_dec": w["b_dec"]}, out / "sae_weights.safetensors")
            ref = load_file(layer / "ref_scale.safetensors")
            save_file({k: v[:n].contiguous() for k, v in ref.items()}, out / "ref_scale.safetensors")
            cfg["d_sae"] = n
            md["dropped"] = (f"trained {trained_width} wide; latents {n}-{trained_width - 1}, added at the start of "
                             "the continued run, were dropped at merge (--keep-latents)")
        else:
            for f in ("sae_weights.safetensors", "ref_scale.safetensors"):
                shutil.copy2(layer / f, out / f)
        md["continued_from"] = (f"{a.site} SAE of this folder at commit {a.base_commit} ({before} tokens, "
                                f"k {k_before}, width {w_before})")
        if cfg["d_sae"] > w_before:
            md["widened"] = (f"latents 0-{w_before - 1} continue the saved ones; {w_before}-{cfg['d_sae'] - 1} "
                             "were added at the start of the continued run")
        md["trained_tokens"] = before + run["tokens_seen"]
        md["continued_tokens"] = run["tokens_seen"]
        md["align_weight"] = run["config"]["align_weight"] if a.site == "res" else 0.0
        (out / "cfg.json").write_text(json.dumps(cfg))
    tc = a.dst / "train_config.json"
    d = json.loads(tc.read_text())
    set_keeping_earlier(d, f"{a.site}_continued", {**run, "base_commit": a.base_commit,
                                                   "keep_latents": a.keep_latents or None})
    tc.write_text(json.dumps(d, indent=2))
    log.info("merged %d %s SAEs: %d + %d tokens", len(layers), a.site, before, run["tokens_seen"])


def set_keeping_earlier(d: dict, key: str, value) -> None:
    """``d[key] = value``; a value already there (an earlier run's record) moves to the list
    ``d[key + "_earlier"]``, oldest first."""
    if key in d:
        d[f"{key}_earlier"] = [*d.get(f"{key}_earlier", []), d[key]]
    d[key] = value


def merge_revived(a, run: dict) -> None:
    """--revived-only: copy the revived latents of each layer into the shipped SAE."""
    import torch

    revived = run.get("revived", {}).get(a.site)
    if revived is None:
        raise ValueError(f"{a.src}/train_config.json lists no revived {a.site} latents: not a --revive-dead run")
    n_dst = len([f for f in (a.dst / a.site).iterdir() if f.name.startswith("layer_")])
    if len(revived) != n_dst:
        raise ValueError(f"the run revived latents in {len(revived)} layers, {a.dst / a.site} has {n_dst}")
    total = 0
    rare = run.get("config", {}).get("revive_max_fires", 0)
    what = f"fired at most {rare} times over the run's first window" if rare else "dead"
    for l, idx in enumerate(revived):
        if not idx:  # a layer the run revived nothing at (--revive-layers): its files stay as they are
            continue
        src, out = a.src / a.site / f"layer_{l}", a.dst / a.site / f"layer_{l}"
        w, base = load_file(src / "sae_weights.safetensors"), load_file(out / "sae_weights.safetensors")
        if w["W_enc"].shape != base["W_enc"].shape:
            raise ValueError(f"{src}: W_enc {tuple(w['W_enc'].shape)} but the shipped SAE has "
                             f"{tuple(base['W_enc'].shape)}")
        cfg = json.loads((out / "cfg.json").read_text())
        scales = [json.loads((src / "cfg.json").read_text())["metadata"].get("input_scale"),
                  cfg["metadata"].get("input_scale")]
        if scales[0] != scales[1]:
            raise ValueError(f"{src}: input scale {scales[0]} but the shipped SAE's is {scales[1]}: "
                             "the run did not start from these SAEs")
        keep = torch.ones(w["W_dec"].shape[0], dtype=torch.bool)
        keep[idx] = False
        for name, sl in (("W_enc", (slice(None), keep)), ("b_enc", keep), ("W_dec", keep), ("b_dec", slice(None))):
            if not torch.allclose(w[name][sl].float(), base[name][sl].float(), rtol=1e-3, atol=1e-4):
                raise ValueError(f"{src}: {name} of latents the run did not revive differs from the shipped "
                                 "SAE's: the run did not start from these SAEs, or it trained them")
        ref, base_ref = load_file(src / "ref_scale.safetensors"), load_file(out / "ref_scale.safetensors")
        base["W_enc"][:, idx] = w["W_enc"][:, idx]
        base["b_enc"][idx] = w["b_enc"][idx]
        base["W_dec"][idx] = w["W_dec"][idx]
        base_ref["ref_scale"][idx] = ref["ref_scale"][idx]
        save_file(base, out / "sae_weights.safetensors")
        save_file(base_ref, out / "ref_scale.safetensors")
        set_keeping_earlier(cfg["metadata"], "revived",
                            f"{len(idx)} latents {what} in the SAE of commit {a.base_commit} were resampled and "
                            f"trained alone for {run['tokens_seen']} tokens; every other weight is that commit's")
        (out / "cfg.json").write_text(json.dumps(cfg))
        total += len(idx)
    tc = a.dst / "train_config.json"
    d = json.loads(tc.read_text())
    set_keeping_earlier(d, f"{a.site}_revived", {**run, "base_commit": a.base_commit})
    tc.write_text(json.dumps(d, indent=2))
    log.info("merged %d revived %s latents over %d layers", total, a.site, len(revived))


if __name__ == "__main__":
    main()
