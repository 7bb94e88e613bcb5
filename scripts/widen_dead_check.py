"""Dead share of the latents a widened residual run added (session 12: the A/B of the widening init).

    python scripts/widen_dead_check.py   # reads /tmp/w_old and /tmp/w_new, two runs of
    # python -m steering.training.train --out /tmp/w_{old,new} --widths res=1088 --k res=64 \\
    #     --init-from assets/saes_v2 --max-minutes 4 ... (old: the trainer at 7b7dcc1, new: after 11e79ac)

For layers 0, 8, 16, 24, 29 on 6,000 held-out tokens (4 domains): latents 1024+ that never fire,
their share of all firings, and the FVE. Results: docs/saes.md, "Session 12".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sae_lens import SAE
from steering.bundle import Bundle
from steering.training.alignment import capture, domain_texts, fve
b = Bundle.load("default")
b.saes = {k: v for k, v in b.saes.items() if k[1] == "res"}
texts = [t for d in ("prose", "code", "math", "everyday") for t in domain_texts(d, 40)]
acts = capture(b, texts, 6000)
for v in ("old", "new"):
    out = []
    for l in (0, 8, 16, 24, 29):
        sae = SAE.load_from_disk(f"/tmp/w_{v}/res/layer_{l}")
        x = acts[(l, "res")].to(sae.W_dec.dtype)
        z = sae.encode(x)
        fired = (z > 0).any(0)
        share = float((z[:, 1024:] > 0).sum() / (z > 0).sum())
        dead_new, dead_old = int((~fired[1024:]).sum()), int((~fired[:1024]).sum())
        out.append(f"L{l}: dead new {dead_new}/{z.shape[1] - 1024}, old {dead_old}/1024, "
                   f"new-latent share of L0 {share:.3f}, FVE {fve(acts[(l, 'res')], sae.decode(z).float()):.3f}")
    print(v, "; ".join(out), flush=True)
