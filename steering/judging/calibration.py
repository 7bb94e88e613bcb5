"""Calibration and evaluation of the offline fallback judge (issue 17; paper §4.2 scores 0-5).

    python -m steering judge calibrate --perplexity-preset default

The labelled set (``assets/judge/labelled.jsonl``) holds hand-written texts, each with a theme and
hand labels 0-5 for theme presence ("behavioral") and coherence. Evaluation items are built from
it by rules that need no further judgement:

- ``labelled``: each text with its own theme and labels.
- ``other theme``: a text clearly on its theme (behavioral >= 4) scored against every other theme
  (label 0), except pairs of themes that overlap (`RELATED`). This is the case an audience meets
  most: a steered text that is simply about something else.
- ``word salad``: the words of a fluent text (coherence >= 4) shuffled, seeded, and
  ``repetition``: its first three words looped to the same length (what oversteering produces):
  coherence label 0 (no theme label).

A quarter of the texts (every 4th, with all of their items) is held out: the theme map (a
logistic of the relative embedding similarity) and the perplexity range of the coherence score
are fitted on the rest, and every figure of ``evaluation`` is computed on the held-out items:
the share of off-theme items (label <= 1) scored <= 1/5, the share of word salad scored <= 1/5
coherence, Spearman correlations with the labels, and how often the reported interval holds the
label. The interval: score +- the 80th percentile of the absolute theme-score error on the
fitting items whose score fell in the same bin (`offline.BINS`); a score whose interval spans more
than ``offline.UNCERTAIN_WIDTH`` points is reported as "uncertain" (`offline.interval`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..embeddings import minilm_vocab
from ..metrics import model_perplexity_fn
from .base import JUDGE_DIR
from .offline import (BINS, PPL_HI, PPL_LO, SIMILARITY_METHOD, UNCERTAIN_WIDTH, OfflineJudge, coherence_score,
                      coherence_signals, interval, is_uncertain, load_calibration, logistic, score_bin)

RELATED = (frozenset({"anger and frustration", "mental health issues"}),
           frozenset({"scientific concepts and entities", "programming and code"}))
HELD_OUT_EVERY = 4
INTERVAL_QUANTILE = 0.8


def load_rows(path: Path | None = None) -> list[dict]:
    path = path or JUDGE_DIR / "labelled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def word_salad(text: str, seed: int) -> str:
    """The text's words in a seeded random order (a fluent text made incoherent)."""
    words = re.findall(r"\w+|[^\w\s]", text)
    random.Random(seed).shuffle(words)
    return " ".join(words)


def repetition_loop(text: str, n: int = 3) -> str:
    """The text's first ``n`` words repeated to its length: the degenerate loop that oversteered
    generation falls into."""
    words = text.split()
    return " ".join(words[k % n] for k in range(len(words))) if len(words) > n else " ".join(words * 4)


def build_items(rows: list[dict]) -> list[dict]:
    """Evaluation items (see the module docstring): dicts with text, prompt, theme, behavioral
    (None for word salad), coherence, kind and text_id (the labelled row it comes from)."""
    themes = sorted({r["theme"] for r in rows})
    items = []
    for i, r in enumerate(rows):
        base = {"text_id": i, "prompt": r.get("prompt", "I think ")}
        items.append({**base, "text": r["text"], "theme": r["theme"], "behavioral": float(r["behavioral"]),
                      "coherence": float(r["coherence"]), "kind": "labelled"})
        if r["behavioral"] >= 4 and r["coherence"] >= 4:
            for t in themes:
                if t != r["theme"] and frozenset({t, r["theme"]}) not in RELATED:
                    items.append({**base, "text": r["text"], "theme": t, "behavioral": 0.0,
                                  "coherence": float(r["coherence"]), "kind": "other theme"})
        if r["coherence"] >= 4:
            items.append({**base, "text": word_salad(r["text"], i), "theme": r["theme"], "behavioral": None,
                          "coherence": 0.0, "kind": "word salad"})
            items.append({**base, "text": repetition_loop(r["text"]), "theme": r["theme"], "behavioral": None,
                          "coherence": 0.0, "kind": "repetition"})
    return items


def held_out(item: dict) -> bool:
    return item["text_id"] % HELD_OUT_EVERY == 0


def _spearman(pred: list[float], gold: list[float]) -> float:
    from scipy.stats import spearmanr

    return round(float(spearmanr(pred, gold).statistic), 3)


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else 0.0


def evaluate(items: list[dict], sims: list[float], cohs: list[float], a: float, b: float,
             halves: list[float]) -> dict:
    """Figures of the held-out items for a theme map (a, b) and per-bin interval half-widths."""
    idx = [i for i, it in enumerate(items) if held_out(it)]
    theme_idx = [i for i in idx if items[i]["behavioral"] is not None]
    pred = {i: logistic(sims[i], a, b) for i in theme_idx}
    off = [i for i in theme_idx if items[i]["behavioral"] <= 1]
    on = [i for i in theme_idx if items[i]["behavioral"] >= 4]
    salad = [i for i in idx if items[i]["kind"] in ("word salad", "repetition")]
    fluent = [i for i in idx if items[i]["coherence"] >= 4 and items[i]["kind"] == "labelled"]
    coh_idx = [i for i in idx if items[i]["kind"] != "other theme"]  # each text once
    inside = [i for i in theme_idx if interval(pred[i], halves)[0] <= items[i]["behavioral"]
              <= interval(pred[i], halves)[1]]
    uncertain = [i for i in theme_idx if is_uncertain(pred[i], halves)]
    confident_off = [i for i in off if not is_uncertain(pred[i], halves)]
    return {
        "n_items": len(idx), "n_texts": len({items[i]["text_id"] for i in idx}),
        "off_theme_scored_le_1": round(sum(pred[i] <= 1 for i in off) / max(1, len(off)), 3), "n_off_theme": len(off),
        "on_theme_scored_ge_3": round(sum(pred[i] >= 3 for i in on) / max(1, len(on)), 3), "n_on_theme": len(on),
        "word_salad_coherence_le_1": round(sum(cohs[i] <= 1 for i in salad) / max(1, len(salad)), 3),
        "n_word_salad": len(salad),
        "fluent_coherence_ge_4": round(sum(cohs[i] >= 4 for i in fluent) / max(1, len(fluent)), 3),
        "spearman_behavioral": _spearman([pred[i] for i in theme_idx], [items[i]["behavioral"] for i in theme_idx]),
        "spearman_coherence": _spearman([cohs[i] for i in coh_idx], [items[i]["coherence"] for i in coh_idx]),
        "interval_holds_label": round(len(inside) / max(1, len(theme_idx)), 3),
        "share_uncertain": round(len(uncertain) / max(1, len(theme_idx)), 3),
        "off_theme_confident_and_le_1": round(sum(pred[i] <= 1 for i in confident_off) / max(1, len(confident_off)), 3),
    }


def calibrate(labelled: Path | None = None, perplexity_preset: str = "") -> dict:
    """Fit the offline judge on the fitting part of the items and evaluate it on the held-out
    part (module docstring); also evaluates the calibration in use before the fit, when there
    is one. With ``perplexity_preset`` every text's perplexity under that preset's model (no
    SAEs) feeds the coherence score, as in the app."""
    rows = load_rows(labelled)
    items = build_items(rows)
    judge = OfflineJudge(calibration={})
    sims = [0.0] * len(items)
    for theme in sorted({it["theme"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["theme"] == theme]
        for i, s in zip(idx, judge.similarity([items[i]["text"] for i in idx], theme)):
            sims[i] = s
    ppl = text_perplexities(items, perplexity_preset) if perplexity_preset else [None] * len(items)
    fit = [i for i, it in enumerate(items) if not held_out(it)]
    fit_b = [i for i in fit if items[i]["behavioral"] is not None]
    a, b = _fit_logistic([sims[i] for i in fit_b], [items[i]["behavioral"] for i in fit_b])
    errs = [(logistic(sims[i], a, b), abs(logistic(sims[i], a, b) - items[i]["behavioral"])) for i in fit_b]
    halves = [round(_quantile([e for p, e in errs if score_bin(p) == k], INTERVAL_QUANTILE), 3)
              if any(score_bin(p) == k for p, _ in errs) else 5.0  # a bin never seen: as unsure as can be
              for k in range(len(BINS) + 1)]
    vocab = minilm_vocab()
    sigs = [coherence_signals(it["text"], p, vocab) for it, p in zip(items, ppl)]
    lo, hi = (PPL_LO, PPL_HI)
    if perplexity_preset:
        lo, hi = _fit_ppl_range([sigs[i] for i in fit], [items[i]["coherence"] for i in fit])
    cohs = [coherence_score(s, lo, hi) for s in sigs]
    result = {
        "similarity_method": SIMILARITY_METHOD,
        "behavioral": {"a": round(a, 4), "b": round(b, 5), "formula": "5 / (1 + exp(-a (similarity - b)))",
                       "interval_bins": list(BINS), "interval_half_widths": halves,
                       "uncertain_width": UNCERTAIN_WIDTH},
        "coherence": {"ppl_lo": lo, "ppl_hi": hi, "perplexity_model": perplexity_preset or "none (local signals)"},
        "n_labelled": len(rows), "n_themes": len({r["theme"] for r in rows}), "n_items": len(items),
        "n_items_by_kind": {k: sum(it["kind"] == k for it in items)
                            for k in ("labelled", "other theme", "word salad", "repetition")},
        "n_texts": len({it["text"] for it in items}), "n_hand_labelled_texts": len(rows),
        "held_out": f"every {HELD_OUT_EVERY}th labelled text with all of its items",
        "evaluation": evaluate(items, sims, cohs, a, b, halves),
        "note": "figures of `evaluation` are on held-out items only (steering/judging/calibration.py says how items "
                "are built from the hand-labelled texts)",
    }
    try:
        old = load_calibration(JUDGE_DIR / "calibration.json")
        ob = old["behavioral"]
        oc = old.get("coherence", {})
        old_cohs = [coherence_score(s, oc.get("ppl_lo", PPL_LO), oc.get("ppl_hi", PPL_HI)) for s in sigs]
        result["evaluation_before"] = evaluate(items, sims, old_cohs, ob["a"], ob["b"],
                                               ob.get("interval_half_widths", []))
    except (FileNotFoundError, ValueError, KeyError):
        pass
    return result


def _fit_logistic(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares fit of y (0-5) = 5 / (1 + exp(-a (x - b)))."""
    import numpy as np
    from scipy.optimize import curve_fit

    def f(v, a, b):
        return 5.0 / (1.0 + np.exp(-np.clip(a * (v - b), -60, 60)))

    (a, b), _ = curve_fit(f, np.asarray(x), np.asarray(y, dtype=float), p0=[20.0, float(np.median(x))], maxfev=20000)
    return float(a), float(b)


def _fit_ppl_range(sigs: list[dict], gold: list[float]) -> tuple[float, float]:
    """Grid search of (ppl_lo, ppl_hi) minimising the coherence MAE. The ramp spans at least a
    decade of perplexity (ppl_hi >= 10 ppl_lo), so that a few labels cannot turn it into a step."""
    best = None
    for lo in (10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300):
        for hi in (300, 500, 700, 1000, 1500, 2000, 3000, 5000, 7000, 10000, 20000):
            if hi < lo * 10:
                continue
            mae = sum(abs(coherence_score(s, lo, hi) - g) for s, g in zip(sigs, gold))
            if best is None or mae < best[0]:
                best = (mae, lo, hi)
    return float(best[1]), float(best[2])


def text_perplexities(items: list[dict], preset: str) -> list[float | None]:
    """Perplexity of every item's text under ``preset``'s model (no SAEs), after its prompt."""
    import torch

    from ..bundle import load_model, pick_device
    from ..presets import get_preset

    model, tok = load_model(get_preset(preset), pick_device("cpu"), torch.float32)
    out: list[float | None] = [None] * len(items)
    for prompt in sorted({it["prompt"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["prompt"] == prompt]
        texts = sorted({items[i]["text"] for i in idx})
        by_text = dict(zip(texts, model_perplexity_fn(model, tok, prefix=prompt)(texts)))
        for i in idx:
            out[i] = by_text[items[i]["text"]]
    return out
