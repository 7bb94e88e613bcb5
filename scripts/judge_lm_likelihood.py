"""Does the default model's own likelihood help the offline judge rank theme presence? (session 12)

    python scripts/judge_lm_likelihood.py

For every hand-labelled text of assets/judge/labelled.jsonl: the mean per-token log-ratio of its
likelihood under the default model after "Here is a short text about {theme}.\\n\\n" against after
"Here is a short text.\\n\\n" (a pointwise mutual information of text and theme). Prints the
Spearman correlation with the hand labels on the judge's held-out quarter (every 4th text) of that
signal alone, of the judge's 4 MiniLM features fitted on the other hand-labelled texts, and of
the 4 features plus this one (per-token mean, sum, and mean x sqrt(length)). It lifted the
held-out Spearman from 0.751 to 0.774 (docs/results.md, the judge bullet) and was not adopted
then; session 17 adopted the signal with another prefix (steering/judging/offline.py, LM_TEMPLATES).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from steering.bundle import load_model, pick_device  # noqa: E402
from steering.judging.calibration import HELD_OUT_EVERY, fit_theme_weights, load_rows  # noqa: E402
from steering.judging.offline import THEME_FEATURES, OfflineJudge, theme_score  # noqa: E402
from steering.metrics import model_perplexity_fn  # noqa: E402
from steering.presets import get_preset  # noqa: E402


def main() -> None:
    rows = load_rows()
    model, tok = load_model(get_preset("default"), pick_device("cpu"), torch.float32)
    texts = [r["text"] for r in rows]
    neutral = model_perplexity_fn(model, tok, prefix="Here is a short text.\n\n")(texts)
    own: list[float] = [0.0] * len(rows)
    for theme in sorted({r["theme"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["theme"] == theme]
        fn = model_perplexity_fn(model, tok, prefix=f"Here is a short text about {theme}.\n\n")
        for i, p in zip(idx, fn([texts[i] for i in idx])):
            own[i] = p
    pmi = np.array([math.log(n) - math.log(o) for n, o in zip(neutral, own)])  # [n_texts], nats per token
    n_tok = np.array([len(tok(t, add_special_tokens=False).input_ids) for t in texts])
    judge = OfflineJudge()
    feats = [judge.theme_features([r["text"]], r["theme"])[0] for r in rows]
    gold = np.array([float(r["behavioral"]) for r in rows])
    held = np.array([i % HELD_OUT_EVERY == 0 for i in range(len(rows))])
    fit = [i for i in range(len(rows)) if not held[i]]
    test = [i for i in range(len(rows)) if held[i]]
    print(f"LM log-ratio alone: held-out Spearman {spearmanr(pmi[held], gold[held]).statistic:.3f}")
    w = fit_theme_weights([feats[i] for i in fit], list(gold[fit]))
    base = [theme_score(feats[i], w) for i in test]
    print(f"4 MiniLM features (fit on hand-labelled texts): {spearmanr(base, gold[test]).statistic:.3f}")
    for name, extra in (("mean", pmi), ("sum", pmi * n_tok), ("mean x sqrt(len)", pmi * np.sqrt(n_tok))):
        f2 = [list(f) + [float(e)] for f, e in zip(feats, extra)]
        w2 = fit_theme_weights([f2[i] for i in fit], list(gold[fit]), (*THEME_FEATURES, "lm_log_ratio"))
        score = [theme_score(f2[i], w2) for i in test]
        print(f"4 features + LM log-ratio ({name}): {spearmanr(score, gold[test]).statistic:.3f}")


if __name__ == "__main__":
    main()
