"""Calibration and evaluation of the offline fallback judge (issue 17; paper §4.2 scores 0-5).

    python -m steering judge calibrate --perplexity-preset default

The labelled set (``assets/judge/labelled.jsonl``) holds texts, each with a theme and hand labels
0-5 for theme presence ("behavioral") and coherence. The first 418 are hand-written; the 105 after
the first 313 were written to fill the graded middle (a passing mention, half or mostly on theme,
on theme without the obvious word, a theme word in another sense) and labelled before any judge
score was seen. The last 112 (session 17) are real steered samples of the demo sweep
(results/default/demo/sweep.json, T = 1.27, 36 tokens; 16 drawn at random from each of seven
perplexity bins, then shuffled), labelled by reading them blind to their perplexity and scores:
what the app's judge meets, half-broken text included, which hand-written texts did not cover.
Evaluation items are built from it by rules that need no further judgement:

- ``labelled``: each text with its own theme and labels.
- ``other theme``: a text clearly on its theme (behavioral >= 4) scored against every other theme
  (label 0), except pairs of themes that overlap (`RELATED`). This is the case an audience meets
  most: a steered text that is simply about something else.
- ``word salad``: the words of a fluent text (coherence >= 4) shuffled, seeded, and
  ``repetition``: its first three words looped to the same length (what oversteering produces):
  coherence label 0 (no theme label).

A quarter of the texts (every 4th by position in the file, index % 4 == 0, with all of their
items; a fixed rule, never chosen by looking at scores) is held out: the theme map (non-negative
weights of a logistic over `offline.THEME_FEATURES`: whole-text, clause and word similarities) and the
perplexity range of the coherence score are fitted on the rest, and every figure of
``evaluation`` is computed on the held-out items: the share of off-theme items (label <= 1)
scored <= 1/5, the share of word salad scored <= 1/5 coherence, Spearman correlations with the
labels, and how often the reported interval holds the label. Spearman is given over all theme
items (``spearman_behavioral``; most of them are label 0, so even a perfect scorer without ties
stays at ``spearman_behavioral_ceiling``) and over the hand-labelled texts alone
(``spearman_behavioral_hand_labelled``, labels spread over 0-5). The interval: score +- the
80th percentile of the absolute theme-score error on the fitting items whose score fell in the
same bin (`offline.BINS`); a score whose interval spans more
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
from .offline import (BINS, LM_FEATURE, LM_TEMPLATES, PPL_HI, PPL_LO, SIMILARITY_METHOD, THEME_FEATURES,
                      UNCERTAIN_WIDTH, OfflineJudge, coherence_score, coherence_signals, feature_vector, interval,
                      is_uncertain, logistic, score_bin, theme_logratio_fn, theme_score)

RELATED = (frozenset({"anger and frustration", "mental health issues"}),
           frozenset({"sadness and grief", "mental health issues"}),
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
        base = {"text_id": i, "prompt": r.get("prompt", "I think "), "generated": bool(r.get("generated"))}
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


def _spearman_ceiling(gold: list[float]) -> float:
    """The highest Spearman any scorer without ties can reach against labels with these ties
    (it ranks every tied group in some order: the gold ranks are averaged, the predicted are not)."""
    pred = [0.0] * len(gold)
    for rank, i in enumerate(sorted(range(len(gold)), key=lambda i: gold[i])):
        pred[i] = float(rank)
    return _spearman(pred, gold)


def evaluate(items: list[dict], pred: dict[int, float], cohs: list[float], halves: list[float]) -> dict:
    """Figures of the held-out items for theme scores ``pred`` (item index -> 0-5, every held-out
    item with a theme label), coherence scores ``cohs`` (one per item) and per-bin interval
    half-widths."""
    idx = [i for i, it in enumerate(items) if held_out(it)]
    theme_idx = [i for i in idx if items[i]["behavioral"] is not None]
    hand = [i for i in theme_idx if items[i]["kind"] == "labelled"]
    off = [i for i in theme_idx if items[i]["behavioral"] <= 1]
    hand_off = [i for i in hand if items[i]["behavioral"] <= 1]
    on = [i for i in theme_idx if items[i]["behavioral"] >= 4]
    salad = [i for i in idx if items[i]["kind"] in ("word salad", "repetition")]
    fluent = [i for i in idx if items[i]["coherence"] >= 4 and items[i]["kind"] == "labelled"]
    coh_idx = [i for i in idx if items[i]["kind"] != "other theme"]  # each text once
    gen = [i for i in coh_idx if coherence_group(items[i]) == "generated"]
    gen_bad = [i for i in gen if items[i]["coherence"] <= 2]  # labelled mostly broken
    gen_fluent = [i for i in gen if items[i]["coherence"] >= 4]
    hand_coh = [i for i in coh_idx if coherence_group(items[i]) == "hand-written"]
    inside = [i for i in theme_idx if interval(pred[i], halves)[0] <= items[i]["behavioral"]
              <= interval(pred[i], halves)[1]]
    uncertain = [i for i in theme_idx if is_uncertain(pred[i], halves)]
    confident_off = [i for i in off if not is_uncertain(pred[i], halves)]
    gold = [items[i]["behavioral"] for i in theme_idx]
    return {
        "n_items": len(idx), "n_texts": len({items[i]["text_id"] for i in idx}),
        "off_theme_scored_le_1": round(sum(pred[i] <= 1 for i in off) / max(1, len(off)), 3), "n_off_theme": len(off),
        "hand_labelled_off_theme_scored_le_1": round(sum(pred[i] <= 1 for i in hand_off) / max(1, len(hand_off)), 3),
        "n_hand_labelled_off_theme": len(hand_off),
        "on_theme_scored_ge_3": round(sum(pred[i] >= 3 for i in on) / max(1, len(on)), 3), "n_on_theme": len(on),
        "word_salad_coherence_le_1": round(sum(cohs[i] <= 1 for i in salad) / max(1, len(salad)), 3),
        "n_word_salad": len(salad),
        "fluent_coherence_ge_4": round(sum(cohs[i] >= 4 for i in fluent) / max(1, len(fluent)), 3),
        "spearman_behavioral": _spearman([pred[i] for i in theme_idx], gold),
        "spearman_behavioral_ceiling": _spearman_ceiling(gold),
        "spearman_behavioral_hand_labelled": _spearman([pred[i] for i in hand], [items[i]["behavioral"] for i in hand]),
        "n_hand_labelled": len(hand),
        "spearman_coherence": _spearman([cohs[i] for i in coh_idx], [items[i]["coherence"] for i in coh_idx]),
        # the texts the app's judge meets: generated by the steered model (labelled from session 17)
        "spearman_coherence_generated": _spearman([cohs[i] for i in gen], [items[i]["coherence"] for i in gen]),
        "coherence_mae_generated": round(sum(abs(cohs[i] - items[i]["coherence"]) for i in gen) / max(1, len(gen)), 3),
        "generated_le_2_scored_ge_4": round(sum(cohs[i] >= 4 for i in gen_bad) / max(1, len(gen_bad)), 3),
        "fluent_generated_ge_4": round(sum(cohs[i] >= 4 for i in gen_fluent) / max(1, len(gen_fluent)), 3),
        "fluent_hand_written_ge_4": round(sum(cohs[i] >= 4 for i in fluent if i not in gen_fluent)
                                          / max(1, len(fluent) - len(gen_fluent)), 3),
        "n_generated_fluent": len(gen_fluent),
        "n_generated": len(gen), "n_generated_le_2": len(gen_bad),
        "coherence_mae_hand_written": round(sum(abs(cohs[i] - items[i]["coherence"]) for i in hand_coh)
                                            / max(1, len(hand_coh)), 3),
        "interval_holds_label": round(len(inside) / max(1, len(theme_idx)), 3),
        "share_uncertain": round(len(uncertain) / max(1, len(theme_idx)), 3),
        "off_theme_confident_and_le_1": round(sum(pred[i] <= 1 for i in confident_off) / max(1, len(confident_off)), 3),
    }


def theme_item_similarities(items: list[dict], judge: OfflineJudge | None = None) -> list[tuple | None]:
    """`OfflineJudge.theme_similarities` of every item for its theme: (whole, clauses, words), or
    None for items without a theme label. [n_items]."""
    judge = judge or OfflineJudge(calibration={})
    sims: list[tuple | None] = [None] * len(items)
    for theme in sorted({it["theme"] for it in items}):
        idx = [i for i, it in enumerate(items) if it["theme"] == theme and it["behavioral"] is not None]
        for i, s in zip(idx, judge.theme_similarities([items[i]["text"] for i in idx], theme)):
            sims[i] = s
    return sims


def theme_item_features(items: list[dict], judge: OfflineJudge | None = None) -> list[list[float] | None]:
    """`THEME_FEATURES` of every item for its theme (None for items without a theme label)."""
    return [None if s is None else feature_vector(*s) for s in theme_item_similarities(items, judge)]


# The theme features of the method this calibration replaced (8 features, weights of any sign), kept
# to evaluate it on the same split (`evaluation_previous_method`).
PREVIOUS_FEATURES = ("whole", "clause_max", "clause_top2", "word_max", "word_top3", "lexicon_share_10",
                     "lexicon_share_15", "word_mean")
PREVIOUS_LEXICON_THRESHOLDS = (0.10, 0.15)


def previous_feature_vector(whole: float, clauses: list[float], words: list[float]) -> list[float]:
    """`PREVIOUS_FEATURES` of one text from the same similarities as `offline.feature_vector`:
    best clause, mean of the top 2 clauses, best word, mean of the top 3 words, share of words
    above each `PREVIOUS_LEXICON_THRESHOLDS`, mean word (no words: one word at -0.2)."""
    cs = sorted(clauses, reverse=True)
    ws = sorted(words, reverse=True) or [-0.2]
    return [whole, cs[0], sum(cs[:2]) / len(cs[:2]), ws[0], sum(ws[:3]) / len(ws[:3]),
            *(sum(w > t for w in ws) / len(ws) for t in PREVIOUS_LEXICON_THRESHOLDS), sum(ws) / len(ws)]


def _halves(pred: list[float], gold: list[float]) -> list[float]:
    """Per-bin interval half-widths: the INTERVAL_QUANTILE of |score - label| of the fitting items
    whose score fell in each bin (5.0, as unsure as can be, for a bin never seen)."""
    errs = [(p, abs(p - g)) for p, g in zip(pred, gold)]
    return [round(_quantile([e for p, e in errs if score_bin(p) == k], INTERVAL_QUANTILE), 3)
            if any(score_bin(p) == k for p, _ in errs) else 5.0 for k in range(len(BINS) + 1)]


def calibrate(labelled: Path | None = None, perplexity_preset: str = "", previous: Path | None = None) -> dict:
    """Fit the offline judge on the fitting part of the items and evaluate it on the held-out
    part (module docstring). Also fits and evaluates on the same split the method it replaced
    (`PREVIOUS_FEATURES`, weights of any sign) and the whole-text baseline (one logistic of the
    whole text's relative similarity, the method before issue 17), and keeps what earlier
    calibration files reported (`_history`). With ``perplexity_preset`` every text's perplexity
    under that preset's model (no SAEs) feeds the coherence score, as in the app, and the theme
    map is fitted a second time with the model's log-likelihood ratio as a fifth feature
    (``behavioral_lm``, what the app on that preset uses; its figures are ``evaluation``, those of
    the MiniLM features alone ``evaluation_minilm_only``)."""
    rows = load_rows(labelled)
    items = build_items(rows)
    sims = theme_item_similarities(items)
    feats = [None if s is None else feature_vector(*s) for s in sims]
    ppl, lm = [None] * len(items), [None] * len(items)
    if perplexity_preset:
        model, tok = _load(perplexity_preset)
        ppl = text_perplexities(items, model, tok)
        lm = theme_item_logratios(items, model, tok)
    fit = [i for i, it in enumerate(items) if not held_out(it)]
    fit_b = [i for i in fit if items[i]["behavioral"] is not None]
    theme_idx = [i for i, it in enumerate(items) if it["behavioral"] is not None]
    gold = [items[i]["behavioral"] for i in fit_b]
    weights = fit_theme_weights([feats[i] for i in fit_b], gold)
    pred = {i: theme_score(feats[i], weights) for i in theme_idx}
    halves = _halves([pred[i] for i in fit_b], gold)
    vocab = minilm_vocab()
    sigs = [coherence_signals(it["text"], p, vocab) for it, p in zip(items, ppl)]
    lo, hi = (PPL_LO, PPL_HI)
    if perplexity_preset:
        lo, hi = _fit_ppl_range([sigs[i] for i in fit], [items[i]["coherence"] for i in fit],
                                [coherence_group(items[i]) for i in fit])
    cohs = [coherence_score(s, lo, hi) for s in sigs]
    prev_feats = {i: previous_feature_vector(*sims[i]) for i in theme_idx}
    prev_w = fit_theme_weights([prev_feats[i] for i in fit_b], gold, PREVIOUS_FEATURES, nonnegative=False)
    prev = {i: theme_score(prev_feats[i], prev_w) for i in theme_idx}
    a, b = _fit_logistic([feats[i][0] for i in fit_b], gold)  # the whole-text baseline
    base = {i: logistic(feats[i][0], a, b) for i in theme_idx}
    minilm_only = evaluate(items, pred, cohs, halves)
    with_lm = {}
    if perplexity_preset:
        feats5 = {i: [*feats[i], lm[i]] for i in theme_idx}
        weights_lm = fit_theme_weights([feats5[i] for i in fit_b], gold, (*THEME_FEATURES, LM_FEATURE))
        pred_lm = {i: theme_score(feats5[i], weights_lm) for i in theme_idx}
        halves_lm = _halves([pred_lm[i] for i in fit_b], gold)
        with_lm = {"behavioral_lm": {**weights_lm, "lm_model": perplexity_preset, "lm_templates": list(LM_TEMPLATES),
                                     "formula": "as behavioral, with the model's per-token log-likelihood ratio "
                                                "(nats) of the text after lm_templates[0] vs lm_templates[1]",
                                     "interval_bins": list(BINS), "interval_half_widths": halves_lm,
                                     "uncertain_width": UNCERTAIN_WIDTH}}
        primary = evaluate(items, pred_lm, cohs, halves_lm)
    result = {
        "similarity_method": SIMILARITY_METHOD,
        "behavioral": {**weights, "formula": "5 sigmoid(bias + sum_k weights_k (feature_k - mean_k) / std_k), "
                                             "weights_k >= 0",
                       "interval_bins": list(BINS), "interval_half_widths": halves,
                       "uncertain_width": UNCERTAIN_WIDTH},
        **with_lm,
        "coherence": {"ppl_lo": lo, "ppl_hi": hi, "perplexity_model": perplexity_preset or "none (local signals)"},
        "n_labelled": len(rows), "n_themes": len({r["theme"] for r in rows}), "n_items": len(items),
        "n_items_by_kind": {k: sum(it["kind"] == k for it in items)
                            for k in ("labelled", "other theme", "word salad", "repetition")},
        "n_texts": len({it["text"] for it in items}), "n_hand_labelled_texts": len(rows),
        "held_out": f"every {HELD_OUT_EVERY}th labelled text (index % {HELD_OUT_EVERY} == 0) with all of its items",
        "evaluation": primary if with_lm else minilm_only,
        **({"evaluation_minilm_only": minilm_only} if with_lm else {}),
        "evaluation_previous_method": {**evaluate(items, prev, cohs, _halves([prev[i] for i in fit_b], gold)),
                                       "features": list(PREVIOUS_FEATURES), "weights": prev_w["weights"]},
        "evaluation_whole_text_baseline": evaluate(items, base, cohs, _halves([base[i] for i in fit_b], gold)),
        "note": "figures of `evaluation` are on held-out items only (steering/judging/calibration.py says how items "
                "are built from the hand-labelled texts), of the `behavioral_lm` fit where there is one (the app "
                "on that preset), else of `behavioral`; `evaluation_minilm_only`: the MiniLM features alone "
                "(`behavioral`, what a judge without that model uses); `evaluation_previous_method`: the method "
                "this one replaced (8 features, weights of any sign) fitted and evaluated on the same split; "
                "`evaluation_whole_text_baseline`: the method before issue 17 (one logistic of the whole text's "
                "similarity, a={:.2f}, b={:.4f}) fitted and evaluated on the same split; "
                "`evaluation_previous_calibration` and `evaluation_before`: what the replaced calibration file and "
                "the one before issue 17 reported, each on its own (smaller) labelled set".format(a, b),
        **_history(previous or JUDGE_DIR / "calibration.json"),
    }
    return result


def _history(path: Path) -> dict:
    """Figures of earlier calibration files to keep beside the new ones: ``evaluation_before``
    (the method before issue 17, carried from file to file) and ``evaluation_previous_calibration``
    (the `evaluation` of the file at ``path`` when it was fitted with another similarity method;
    carried over when it was fitted with this one). Empty without a file."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("similarity_method") == SIMILARITY_METHOD:
        return {k: old[k] for k in ("evaluation_previous_calibration", "evaluation_before") if k in old}
    replaced = {**old.get("evaluation", {}), "n_labelled": old.get("n_labelled"),
                "features": old.get("behavioral", {}).get("features", ["whole"]),
                "weights": old.get("behavioral", {}).get("weights")}
    before = old.get("evaluation_before") or {**replaced,
                                              "method": "one logistic of the whole text's relative similarity"}
    return {"evaluation_previous_calibration": replaced, "evaluation_before": before}


def fit_theme_weights(features: list[list[float]], gold: list[float], names: tuple[str, ...] = THEME_FEATURES,
                      nonnegative: bool = True, l2: float = 1e-3) -> dict:
    """Least-squares fit of gold (0-5) = 5 sigmoid(bias + w . (f - mean) / std) with a small L2
    penalty on w, each w_k >= 0 when ``nonnegative`` (the score then never falls when a feature
    rises). features: [n, len(names)], gold: [n]. Returns the dict `offline.theme_score` reads
    (features, mean, std, weights, bias)."""
    import numpy as np
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=float)  # [n, n_features]
    y = np.asarray(gold, dtype=float)  # [n]
    if x.ndim != 2 or x.shape[1] != len(names) or len(y) != len(x):
        raise ValueError(f"need [n, {len(names)}] features and n labels, got {x.shape} and {len(y)}")
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std

    def loss(p):
        pr = 5.0 / (1.0 + np.exp(-np.clip(z @ p[:-1] + p[-1], -60, 60)))
        return float(((pr - y) ** 2).mean() + l2 * (p[:-1] ** 2).sum())

    bounds = [(0.0, None) if nonnegative else (None, None)] * x.shape[1] + [(None, None)]
    p = minimize(loss, np.zeros(x.shape[1] + 1), method="L-BFGS-B", bounds=bounds).x
    return {"features": list(names), "mean": [round(float(v), 5) for v in mean],
            "std": [round(float(v), 5) for v in std], "weights": [round(float(v), 4) for v in p[:-1]],
            "bias": round(float(p[-1]), 4)}


def _fit_logistic(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares fit of y (0-5) = 5 / (1 + exp(-a (x - b)))."""
    import numpy as np
    from scipy.optimize import curve_fit

    def f(v, a, b):
        return 5.0 / (1.0 + np.exp(-np.clip(a * (v - b), -60, 60)))

    (a, b), _ = curve_fit(f, np.asarray(x), np.asarray(y, dtype=float), p0=[20.0, float(np.median(x))], maxfev=20000)
    return float(a), float(b)


def coherence_group(item: dict) -> str | None:
    """The group an item's coherence label is fitted in (`_fit_ppl_range`): hand-written and
    generated labelled texts apart, word salad, repetition; None for an "other theme" item (the
    same text as a labelled one, counted there)."""
    if item["kind"] == "other theme":
        return None
    if item["kind"] == "labelled":
        return "generated" if item.get("generated") else "hand-written"
    return item["kind"]


def _fit_ppl_range(sigs: list[dict], gold: list[float], groups: list[str | None]) -> tuple[float, float]:
    """Grid search of (ppl_lo, ppl_hi) minimising the mean over ``groups`` (`coherence_group`) of
    each group's coherence MAE. Each group weighs the same: the 298 fluent hand-written texts
    (median perplexity 46 under the default model) would otherwise outvote the generated texts the
    judge actually scores in the app, whose perplexity is lower when fluent (median 16) and whose
    half-broken ones sit at 70-170 (session 17: fitted on all items alike, the ramp began at 150,
    and half-broken steered text scored 5/5). The ramp spans at least a decade of perplexity
    (ppl_hi >= 10 ppl_lo), so that a few labels cannot turn it into a step."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            by_group.setdefault(g, []).append(i)
    best = None
    for lo in (10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300):
        for hi in (300, 500, 700, 1000, 1500, 2000, 3000, 5000, 7000, 10000, 20000):
            if hi < lo * 10:
                continue
            mae = sum(sum(abs(coherence_score(sigs[i], lo, hi) - gold[i]) for i in idx) / len(idx)
                      for idx in by_group.values()) / len(by_group)
            if best is None or mae < best[0]:
                best = (mae, lo, hi)
    return float(best[1]), float(best[2])


def joined(prompt: str, text: str) -> tuple[str, str]:
    """(prompt, text) with the prompt's trailing whitespace moved onto a text that does not start
    with whitespace: "I think " + "the cake" -> "I think" + " the cake". The hand-written texts
    were stored after a prompt ending in a space, and tokenized apart that is "think", " ", "the",
    a split the tokenizer never makes (joined: "think", " the"), which the model finds surprising:
    it raised their median perplexity from 46 to 75 (session 17), the range of half-broken
    steered text. Only the calibration's items are joined: a generated text was sampled after
    the split itself (the app scores it as it came), and the labelled set's generated texts follow
    a prompt without a trailing space, which this leaves unchanged."""
    stripped = prompt.rstrip()
    if stripped != prompt and text and not text[0].isspace():
        return stripped, prompt[len(stripped):] + text
    return prompt, text


def _load(preset: str):
    """The preset's model and tokenizer (no SAEs), fp32 on the CPU."""
    import torch

    from ..bundle import load_model, pick_device
    from ..presets import get_preset

    return load_model(get_preset(preset), pick_device("cpu"), torch.float32)


def text_perplexities(items: list[dict], model, tok) -> list[float | None]:
    """Perplexity of every item's text under ``model`` (no SAEs), after its prompt
    (`joined`: a hand-written text is scored as one string with its prompt)."""
    out: list[float | None] = [None] * len(items)
    pairs = [joined(it["prompt"], it["text"]) for it in items]
    for prompt in sorted({pr for pr, _ in pairs}):
        idx = [i for i, (pr, _) in enumerate(pairs) if pr == prompt]
        texts = sorted({pairs[i][1] for i in idx})
        by_text = dict(zip(texts, model_perplexity_fn(model, tok, prefix=prompt)(texts)))
        for i in idx:
            out[i] = by_text[pairs[i][1]]
    return out


def theme_item_logratios(items: list[dict], model, tok) -> list[float | None]:
    """`offline.theme_logratio_fn` of every theme item for its theme (None for items without a
    theme label), each (text, theme) pair computed once. [n_items]."""
    fn = theme_logratio_fn(model, tok)
    out: list[float | None] = [None] * len(items)
    for theme in sorted({it["theme"] for it in items if it["behavioral"] is not None}):
        idx = [i for i, it in enumerate(items) if it["theme"] == theme and it["behavioral"] is not None]
        texts = sorted({items[i]["text"] for i in idx})
        by_text = dict(zip(texts, fn(texts, theme)))
        for i in idx:
            out[i] = by_text[items[i]["text"]]
    return out
