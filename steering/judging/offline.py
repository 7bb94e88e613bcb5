"""The offline fallback judge, used when no OpenAI key is set and labelled "offline" everywhere.

Theme score (0-5, paper §4.2): relative similarities between local sentence embeddings
(`steering.embeddings`, all-MiniLM-L6-v2) of the theme and the whole text, its clauses and its
content words, combined by a small logistic with non-negative weights (more theme evidence never
lowers the score) fitted on hand labels, with a range and an "uncertain" flag; coherence: local
signals (repetition, gibberish, perplexity under the unsteered model). Its calibration:
`steering.judging.calibration` (``python -m steering judge calibrate``). The word features skip
the best word, so that a single theme word (in an idiom, in word salad) counts only through the
whole text and its clause. Where the judge has the model it was calibrated with (the app on the
default preset: `theme_logratio_fn`), a fifth feature joins them: the model's own log-likelihood
ratio of the text after "I want to talk about {theme}." against after "I want to talk."
(session 17; the `behavioral_lm` fit of the calibration).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

from .. import embeddings
from ..embeddings import minilm_vocab
from ..metrics import PerplexityFn, distinct_n, model_perplexity_fn
from .base import JUDGE_DIR, Score, Task, check_args, make_score

# Perplexity ramp of the offline coherence score, fitted for the default model (SmolLM2-135M) on
# assets/judge/labelled.jsonl by `python -m steering judge calibrate --perplexity-preset default`.
PPL_LO, PPL_HI = 200.0, 2000.0


# ---- coherence from local signals ------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")


def coherence_signals(text: str, perplexity: float | None = None, vocab: frozenset[str] | None = None) -> dict:
    """Local signals of one text.

    distinct_1/2: distinct word uni/bigram ratios (repetition); stutter: share of words equal to
    the word before them ("the the", "is is"); wordlike: share of non-space
    characters inside alphabetic words (symbols, digits); in_vocab: share of alphabetic words
    that are whole words of the embedding model's vocabulary (made-up words; None without a
    vocabulary); perplexity: under the unsteered model, when known.
    """
    words = text.lower().split()
    alpha = _WORD.findall(text.lower())
    n_chars = len("".join(text.split()))
    in_vocab = (sum(w in vocab for w in alpha) / len(alpha) if alpha else 0.0) if vocab is not None else None
    bare = [w.strip(".,;:!?\"'()") for w in words]
    stutter = sum(a == b and a != "" for a, b in zip(bare, bare[1:])) / max(1, len(bare) - 1)
    return {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2), "stutter": stutter,
            "wordlike": sum(map(len, alpha)) / n_chars if n_chars else 0.0, "in_vocab": in_vocab,
            "perplexity": perplexity, "n_words": len(words)}


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def coherence_score(sig: dict, ppl_lo: float = PPL_LO, ppl_hi: float = PPL_HI) -> float:
    """0-5 coherence from local signals: 5 x R x G x P.

    R (repetition) = clip((min(distinct_2, distinct_1 + 0.2) - 0.3) / 0.6, 0, 1)
      x clip(1 - 2 stutter, 0, 1): no repeated bigrams or doubled words gives 1, a loop of one or
      two words or a doubled word every other word gives 0;
    G (gibberish) = clip((wordlike - 0.6) / 0.3, 0, 1) x clip((in_vocab - 0.5) / 0.3, 0, 1)
      (the second factor only when a vocabulary is known);
    P (perplexity) = clip((log ppl_hi - log ppl) / (log ppl_hi - log ppl_lo), 0.2, 1) when the
      perplexity under the unsteered model is known, else 1. ppl_lo / ppl_hi come from the
      calibration (fitted for the default model); at or below ppl_lo the text counts as fluent.
    """
    if sig["n_words"] == 0:
        return 0.0
    rep = _clip01((min(sig["distinct_2"], sig["distinct_1"] + 0.2) - 0.3) / 0.6) * _clip01(1 - 2 * sig["stutter"])
    gib = _clip01((sig["wordlike"] - 0.6) / 0.3)
    if sig.get("in_vocab") is not None:
        gib *= _clip01((sig["in_vocab"] - 0.5) / 0.3)
    ppl = sig.get("perplexity")
    pf = 1.0
    if ppl is not None and math.isfinite(ppl) and ppl > 0:
        pf = min(1.0, max(0.2, (math.log(ppl_hi) - math.log(ppl)) / (math.log(ppl_hi) - math.log(ppl_lo))))
    return round(5 * rep * gib * pf, 3)


# ---- theme score from sentence embeddings ----------------------------------------------------

THEME_TEMPLATE = "This text is about {}."
# Unrelated reference topics: a text's similarity to the theme is measured relative to its
# similarity to the closest of these (generic or off-theme texts are close to many topics).
ANCHOR_TOPICS = (
    "weather", "politics and government", "money and finance", "travel and places", "animals and pets", "music",
    "family and children", "health and medicine", "technology", "history", "nature and plants",
    "cars and transport", "art", "school and education", "work and jobs", "shopping", "houses and buildings",
    "emotions", "time and dates", "language and words", "sports", "food and cooking", "religion",
    "love and romance", "science", "computers and software", "war and the military", "crime and law", "the sea",
    "space and astronomy", "clothing and fashion", "games", "books and literature", "film and television",
    "sleep and dreams", "mathematics", "medicine and illness", "farming", "cities", "holidays and celebrations",
)
ANCHORS_EXCLUDED = 3  # the anchors closest to the theme are dropped (they may be the theme itself)
ANCHORS_TOP = 3  # subtract the mean similarity of the text to its 3 closest remaining anchors
WORD_CACHE_MAX = 50_000  # word embeddings kept (~77 MB at 384 floats); cleared when full
NO_SIMILARITY = -0.2  # what a rank with no clause or word behind it counts as (below any on-theme one)
WORD_RANKS = ((1, 3), (3, 6))  # 0-based ranks of the content-word similarities averaged per feature
# The features of a (text, theme) pair, in the order of the fitted weights (`feature_vector`). Each
# is nondecreasing in every similarity it reads, and the clause and word features never drop when
# a clause or a word is added; the fitted weights are >= 0, so neither can lower the score. The
# best word and the 2nd-best clause are not features (fitted with the others, their weight was 0):
# a theme word in an idiom or in word salad is one strong word.
THEME_FEATURES = ("whole", "clause_max", "word_rank_2_3", "word_rank_4_6")
LM_FEATURE = "lm_log_ratio"
# The prefixes of the model's log-likelihood ratio (`theme_logratio_fn`). Chosen in session 17 among
# six tried by 4-fold cross-validation on the fitting part of the labelled set (0.809; "Here is a
# short text about {}." 0.795, the one session 12 tried; "A story about {}." 0.774).
LM_TEMPLATES = ("I want to talk about {}.\n\n", "I want to talk.\n\n")
ThemeLogRatioFn = Callable[[list[str], str], list[float | None]]
SIMILARITY_METHOD = {"template": THEME_TEMPLATE, "n_anchors": len(ANCHOR_TOPICS),
                     "anchors_excluded": ANCHORS_EXCLUDED, "anchors_top": ANCHORS_TOP,
                     "features": list(THEME_FEATURES), "word_ranks": [list(r) for r in WORD_RANKS],
                     "missing_rank": NO_SIMILARITY, "weights": "non-negative",
                     "clauses": "split at . ; : ! ? , and at and/but/so/because/while/then; pieces under 3 words "
                                "joined to their neighbour"}
OFFLINE_LABEL = ("offline fallback (no OpenAI key): theme = MiniLM similarity of the text, its clauses and "
                 "its words, fitted to hand labels; coherence = local signals")

_SPLIT = re.compile(r"[.;:!?,]+|\s(?:and|but|so|because|while|then)\s", re.IGNORECASE)
STOPWORDS = frozenset("""the a an and or but of to in on at for with by from is are was were be been being it its this
that these those i you he she we they me my your his her our their them us as so if then than too very not no do
does did have has had will would can could should just also there here what which who when where why how all any
some more most other such only own same into over under again once about up down out off""".split())


def split_clauses(text: str) -> list[str]:
    """The text's clauses (`SIMILARITY_METHOD["clauses"]`); the whole text when it has none."""
    out: list[str] = []
    for piece in (p.strip() for p in _SPLIT.split(text)):
        if not piece:
            continue
        if out and len(out[-1].split()) < 3:
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    if len(out) > 1 and len(out[-1].split()) < 3:
        last = out.pop()
        out[-1] = f"{out[-1]} {last}"
    return out or [text]


def content_words(text: str) -> list[str]:
    """Lower-case alphabetic words of 3+ letters that are not function words (repeats kept)."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS]


def rank_mean(values: list[float], lo: int, hi: int, pad: float = NO_SIMILARITY) -> float:
    """Mean of the ``values`` ranked lo..hi-1 (0: the largest), a missing rank counted as ``pad``.

    Nondecreasing in every value and when a value is added (the k-th largest of more values is
    never smaller)."""
    v = sorted([*values, *[pad] * hi], reverse=True)
    return sum(v[lo:hi]) / (hi - lo)


def feature_vector(whole: float, clauses: list[float], words: list[float]) -> list[float]:
    """`THEME_FEATURES` of one text from relative similarities (cosine units, about -0.3..0.5)
    of the whole text, each clause ([n_clauses]) and each content word ([n_words]): the whole
    text, the best clause, the mean of the 2nd-3rd and of the 4th-6th best words."""
    return [whole, rank_mean(clauses, 0, 1), *(rank_mean(words, lo, hi) for lo, hi in WORD_RANKS)]


def theme_logratio_fn(model, tokenizer, lock=None) -> ThemeLogRatioFn:
    """``fn(texts, theme)`` -> the mean per-token log-likelihood ratio (nats per token) of each
    text (stripped of outer whitespace) under ``model`` after ``LM_TEMPLATES[0]`` with the theme
    against after the neutral ``LM_TEMPLATES[1]``: how much naming the theme makes the model
    expect the text (a pointwise mutual information of text and theme). None for a text without
    tokens. Pass the unsteered base model and the bundle's lock (`model_perplexity_fn`)."""
    neutral = model_perplexity_fn(model, tokenizer, lock, prefix=LM_TEMPLATES[1])

    def fn(texts: list[str], theme: str) -> list[float | None]:
        stripped = [t.strip() for t in texts]
        themed = model_perplexity_fn(model, tokenizer, lock, prefix=LM_TEMPLATES[0].format(theme))(stripped)
        return [None if a is None or b is None else math.log(a) - math.log(b)
                for a, b in zip(neutral(stripped), themed)]

    return fn


def bundle_theme_logratio_fn(bundle, calibration: dict | None = None) -> ThemeLogRatioFn | None:
    """`theme_logratio_fn` on a Bundle's model under its lock, or None when the calibration's
    ``behavioral_lm`` fit was made with another preset's model (the ratio's scale is the model's)."""
    fit = (calibration if calibration is not None else load_calibration()).get("behavioral_lm")
    if not fit or fit.get("lm_model") != bundle.preset.name:
        return None
    return theme_logratio_fn(bundle.model, bundle.tokenizer, bundle.lock)


def load_calibration(path: Path | None = None) -> dict:
    path = path or JUDGE_DIR / "calibration.json"
    if not path.is_file():
        raise FileNotFoundError(f"no offline-judge calibration at {path}; run `python -m steering judge calibrate`")
    cal = json.loads(path.read_text())
    if cal.get("similarity_method") != SIMILARITY_METHOD:
        raise ValueError(f"{path} was fitted for another similarity method ({cal.get('similarity_method')}); "
                         "refit with `python -m steering judge calibrate`")
    return cal


def theme_score(features: list[float], fit: dict) -> float:
    """0-5 theme presence (paper §4.2 scale) from `THEME_FEATURES`: 5 sigmoid(w . (f - mean) / std + bias),
    with mean, std, weights and bias fitted by `steering.judging.calibration` on hand labels."""
    z = fit["bias"] + sum(w * (f - m) / s for f, w, m, s in zip(features, fit["weights"], fit["mean"], fit["std"]))
    return logistic(z, 1.0, 0.0)


def logistic(x: float, a: float, b: float) -> float:
    """0-5 theme score from the relative similarity x: 5 / (1 + exp(-a (x - b)))."""
    z = max(-60.0, min(60.0, a * (x - b)))
    return 5.0 / (1.0 + math.exp(-z))


# ---- the reported range of a theme score (fitted by `steering.judging.calibration`) -----------

BINS = (1.5, 3.5)  # predicted theme scores below / between / above: the interval is per bin
UNCERTAIN_WIDTH = 2.5  # a range wider than this is reported as "uncertain"


def score_bin(score: float) -> int:
    return sum(score >= edge for edge in BINS)


def interval(score: float, halves: list[float]) -> tuple[float, float]:
    """The reported range of a theme score: score +- its bin's half-width, within 0-5."""
    h = halves[score_bin(score)] if halves else 5.0  # no calibrated range: the whole scale
    return max(0.0, score - h), min(5.0, score + h)


def is_uncertain(score: float, halves: list[float]) -> bool:
    lo, hi = interval(score, halves)
    return hi - lo > UNCERTAIN_WIDTH


class OfflineJudge:
    """Local fallback, clearly labelled: calibrated embedding similarities (text, clauses, words)
    + local coherence signals.

    The sentence-embedding model loads on first use (~1 s, CPU) and is shared by every caller.
    ``perplexity_fn(texts)`` should give perplexities under the unsteered base model; without it
    coherence uses repetition and gibberish signals only. ``theme_logratio_fn`` (`theme_logratio_fn`
    on the model the calibration's ``behavioral_lm`` fit names) adds the model's log-likelihood
    ratio to the theme features; without it, or without that fit, the MiniLM features alone.
    """

    name = "offline:minilm"
    label = OFFLINE_LABEL
    offline = True

    def __init__(self, perplexity_fn: PerplexityFn | None = None, calibration: Path | dict | None = None,
                 theme_logratio_fn: ThemeLogRatioFn | None = None):
        self.perplexity_fn = perplexity_fn
        self.calibration = calibration if isinstance(calibration, dict) else load_calibration(calibration)
        self.theme_logratio_fn = theme_logratio_fn if "behavioral_lm" in self.calibration else None
        self._theme_cache: dict[str, object] = {}
        self._anchors = None
        self._word_cache: dict[str, object] = {}

    def __repr__(self) -> str:
        return (f"OfflineJudge(perplexity={'yes' if self.perplexity_fn else 'no'}, "
                f"model log-ratio={'yes' if self.theme_logratio_fn else 'no'})")

    def embed(self, texts: list[str]):
        """Unit-norm embeddings, [n, 384] float32 CPU tensor (`steering.embeddings`)."""
        return embeddings.embed(texts)

    def _theme(self, theme: str):
        if theme not in self._theme_cache:
            if len(self._theme_cache) > 256:
                self._theme_cache.clear()
            self._theme_cache[theme] = self.embed([THEME_TEMPLATE.format(theme)])[0]  # [384]
        return self._theme_cache[theme]

    def _relative(self, e, theme: str):
        """cos(e, theme) minus the mean cosine of e to its ANCHORS_TOP closest anchor topics, after
        dropping the ANCHORS_EXCLUDED anchors closest to the theme. e: [n, 384] -> [n]."""
        if self._anchors is None:
            self._anchors = self.embed([THEME_TEMPLATE.format(a) for a in ANCHOR_TOPICS])  # [n_anchors, 384]
        t = self._theme(theme)  # [384]
        keep = (self._anchors @ t).argsort()[: len(ANCHOR_TOPICS) - ANCHORS_EXCLUDED]  # [n_kept]
        ref = (e @ self._anchors[keep].T).topk(ANCHORS_TOP, dim=1).values.mean(1)  # [n]
        return e @ t - ref

    def similarity(self, texts: list[str], theme: str) -> list[float]:
        """Relative similarity of each whole text to the theme (cosine units, `_relative`)."""
        return self._relative(self.embed(texts), theme).tolist()

    def _word_embeddings(self, words: list[str]):
        """Embeddings of "This text is about {word}." for each word, [n, 384], cached per word."""
        import torch

        if len(self._word_cache) + len(set(words)) > WORD_CACHE_MAX:  # bounded: clear first, then fill
            self._word_cache.clear()
        new = sorted({w for w in words if w not in self._word_cache})
        if new:
            self._word_cache.update(zip(new, self.embed([THEME_TEMPLATE.format(w) for w in new])))
        return torch.stack([self._word_cache[w] for w in words])

    def theme_similarities(self, texts: list[str], theme: str) -> list[tuple[float, list[float], list[float]]]:
        """Relative similarities (`_relative`) to the theme of each text: (whole text, its clauses
        [n_clauses], its content words [n_words]). [n_texts]."""
        if not texts:
            return []
        clauses = [split_clauses(t) for t in texts]
        flat = [c for cs in clauses for c in cs]
        words = [content_words(t) for t in texts]
        flat_w = [w for ws in words for w in ws]
        # texts and clauses in one embedding call, each distinct string once (a one-clause text is
        # its own clause)
        uniq = list(dict.fromkeys([*texts, *flat]))
        rel = dict(zip(uniq, self._relative(self.embed(uniq), theme).tolist()))
        whole = [rel[t] for t in texts]  # [n]
        cl = [rel[c] for c in flat]  # [n_clauses]
        wr = self._relative(self._word_embeddings(flat_w), theme).tolist() if flat_w else []  # [n_words]
        out, i, j = [], 0, 0
        for k in range(len(texts)):
            out.append((whole[k], cl[i:i + len(clauses[k])], wr[j:j + len(words[k])]))
            i, j = i + len(clauses[k]), j + len(words[k])
        return out

    def theme_features(self, texts: list[str], theme: str) -> list[list[float]]:
        """`THEME_FEATURES` of each text for the theme (`feature_vector` of its
        `theme_similarities`). [n_texts][n_features]."""
        return [feature_vector(*sims) for sims in self.theme_similarities(texts, theme)]

    @staticmethod
    def fit_key(features: list[float]) -> str:
        """The calibration fit a feature vector is scored with: ``behavioral_lm`` when the model's
        log-ratio is appended to `THEME_FEATURES`, else ``behavioral``."""
        return "behavioral_lm" if len(features) > len(THEME_FEATURES) else "behavioral"

    def behavioral(self, features: list[float]) -> float:
        """0-5 theme score of one text from its `theme_features` (paper §4.2 scale), with the
        model's log-ratio appended (5 features) when the judge has it (`fit_key`)."""
        return theme_score(features, self.calibration[self.fit_key(features)])

    def coherence(self, text: str, perplexity: float | None = None) -> float:
        c = self.calibration.get("coherence", {})
        sig = coherence_signals(text, perplexity, minilm_vocab())
        return coherence_score(sig, c.get("ppl_lo", PPL_LO), c.get("ppl_hi", PPL_HI))

    def score(self, texts: list[str], theme: str, task: Task = "activate",
              perplexities: list[float | None] | None = None) -> list[Score]:
        """``perplexities`` (under the unsteered model, one per text) override ``perplexity_fn``."""
        theme = check_args(texts, theme, task)
        if not texts:
            return []
        if perplexities is not None and len(perplexities) != len(texts):
            raise ValueError(f"got {len(perplexities)} perplexities for {len(texts)} texts")
        if perplexities is None:
            perplexities = self.perplexity_fn(texts) if self.perplexity_fn else [None] * len(texts)
        live = [i for i, t in enumerate(texts) if _WORD.search(t)]
        feats = dict(zip(live, self.theme_features([texts[i] for i in live], theme))) if live else {}
        if self.theme_logratio_fn and live:  # the fifth feature where the model gives one
            for i, lr in zip(live, self.theme_logratio_fn([texts[i] for i in live], theme)):
                if lr is not None:
                    feats[i] = [*feats[i], lr]
        out = []
        for i, (text, ppl) in enumerate(zip(texts, perplexities)):
            if i not in feats:
                out.append(make_score(self.name, task, theme, 0.0, 0.0, "offline: no words in the text",
                                      offline=True, label=self.label))
                continue
            coh = self.coherence(text, ppl)
            ppl_note = f", perplexity {ppl:.0f}" if ppl else ""
            b = round(self.behavioral(feats[i]), 3)
            fit = self.fit_key(feats[i])
            halves = self.calibration.get(fit, {}).get("interval_half_widths", [])
            lo, hi = interval(b, halves)
            unsure = is_uncertain(b, halves)
            reason = (f"offline: theme {b:.1f}/5 (range {lo:.1f}-{hi:.1f}{', uncertain' if unsure else ''}), "
                      f"relative similarity {feats[i][0]:+.2f} (best clause {feats[i][1]:+.2f}, "
                      f"2nd-3rd best words {feats[i][2]:+.2f}"
                      + (f", model log-ratio {feats[i][-1]:+.2f}" if fit == "behavioral_lm" else "")
                      + f"); local coherence signals{ppl_note}")
            sc = make_score(self.name, task, theme, b, coh, reason, offline=True, label=self.label)
            sc.behavioral_range, sc.uncertain = [round(lo, 2), round(hi, 2)], unsure
            out.append(sc)
        return out

