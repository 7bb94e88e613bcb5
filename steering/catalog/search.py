"""Keyword search over the catalog (`Catalog.search`): an inverted index per site and the ranking."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, NamedTuple

from .. import limits
from ..features import parse_feature
from ..presets import SITES
from .labels import DOMAIN_TAGS
from .words import RELATED_WEIGHT, common_promoted, stem, text_words


class Match(NamedTuple):
    """One reason a feature matched: the query ``word``, the catalog ``field`` it was found in
    (label, top, tag, context, promoted; "id" for a feature-id query) and, when it matched through
    a related word (MiniLM neighbour), that ``related`` word ("" for the word itself)."""

    word: str
    field: str
    related: str = ""


def matches_by_word(matched: Iterable[Match]) -> dict[str, list[Match]]:
    """``matched`` grouped by query word, words in order of first appearance (`Hit.reasons` and the
    app's plain-words column both read it)."""
    out: dict[str, list[Match]] = {}
    for m in matched:
        out.setdefault(m.word, []).append(m)
    return out


class Hit(NamedTuple):
    """A search result: feature id, label, relevance score, why it matched (one `Match` per query
    word x field x related word, sorted), and how it fires (max activation, firing frequency)."""

    feature: str
    label: str
    score: float
    matched: tuple[Match, ...]
    max_act: float
    frequency: float

    def reasons(self) -> list[str]:
        """``matched`` compactly, one string per query word: "music (context, top, top ≈musical)"."""
        if any(m.field == "id" for m in self.matched):
            return ["feature id"]
        return [f"{w} ({', '.join(sorted(m.field + (f' ≈{m.related}' if m.related else '') for m in ms))})"
                for w, ms in matches_by_word(self.matched).items()]

    def to_json(self) -> dict:
        return {**self._asdict(), "matched": self.reasons()}


GOOD_SCORE = 1.5  # a hit below this matched only weakly: a related word or a rare top token
# (an exact top-token match scores >= 3 x 0.4 x 2 = 2.4 before the specificity factor)
_FIELD_WEIGHT = {"label": 4.0, "top": 3.0, "tag": 2.5, "context": 1.0, "promoted": 0.8}
_STRONG = {"label", "top", "tag"}  # matches here rank above promoted / context-only matches


def feature_terms(cols: dict, i: int, common: set[str] = frozenset()) -> dict[tuple[str, str], float]:
    """Searchable terms of feature i of an SAE: (stem, field) -> weight in [0, 1]. A top token
    weighs 0.4 + 0.6 x min(1, 2 x its share of the top activations); promoted words in ``common``
    (`common_promoted`) are skipped."""
    best: dict[tuple[str, str], float] = {}

    def add(word: str, fld: str, w: float) -> None:
        key = (stem(word), fld)
        best[key] = max(best.get(key, 0.0), w)

    if cols["src"][i] == "l":
        for w in text_words(cols["label"][i]):
            add(w, "label", 1.0)
    for tok, share in cols["top"][i]:
        for w in text_words(tok.replace("\\n", " ")):
            add(w, "top", 0.4 + 0.6 * min(1.0, 2.0 * share))
    for tag in cols["tags"][i]:
        for w in [tag] + DOMAIN_TAGS.get(tag, []):
            add(w, "tag", 1.0)
    for rank, tok in enumerate(cols["out"][i]):
        for w in text_words(tok):
            if w not in common:
                add(w, "promoted", 1.0 - 0.1 * rank)
    n_ctx = max(1, cols["nctx"][i])
    for w, n in cols["cw"][i]:
        add(w, "context", min(1.0, n / n_ctx))
    return best


def site_index(summary: dict[tuple[int, str], dict], site: str) -> dict[str, list]:
    """Inverted index of one site (DETAIL columns needed): stem -> list of (layer, index, field, weight)."""
    common = common_promoted(summary, site)
    index: dict[str, list] = defaultdict(list)
    for (layer, s), cols in sorted(summary.items()):
        if s != site:
            continue
        for i in range(len(cols["label"])):
            for (term, fld), w in feature_terms(cols, i, common).items():
                index[term].append((layer, i, fld, w))
    return dict(index)


def search(cat, query: str, k: int = 20, sites: Iterable[str] = ("res",),
           layers: Iterable[int] | None = None) -> list[Hit]:
    """Keyword search of the catalog ``cat`` over labels, top tokens, tags, promoted tokens and context words.

    Whole words only (with a light suffix stemmer: 'weddings' finds 'wedding'). Per query
    word a feature scores, per field, its best term's weight (LLM label 4, top token 3 x
    (0.4 + 0.6 x min(1, 2 x its share of the top activations)), tag 2.5, context words 1 x share
    of contexts that contain it, promoted tokens 0.8); fields and query words add up,
    multiplied by the share of query words matched and by a specificity factor
    1 / (1 + 10 x firing frequency), and doubled for features matched in a label, top token or
    tag (not only in promoted tokens or contexts). Hits are sorted by that score.
    Each query word also matches its related words (``related``, MiniLM neighbours stored at
    build time; shown as ``≈word``) at RELATED_WEIGHT x similarity. A feature id
    (``12/res/4111``) as query returns that feature.
    """
    query = limits.clean_text("search query", query, limits.MAX_QUERY_CHARS)
    limits.check_int("k", k, 1, 10_000)
    sites = tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if not sites or bad:
        raise ValueError(f"unknown sites {bad or sites}; valid: {', '.join(SITES)}")
    layer_set = None if layers is None else {int(x) for x in layers}
    if re.fullmatch(r"\s*\d+\s*/\s*[a-zA-Z]+\s*/\s*\d+\s*", query):
        f = parse_feature(query)
        cols = cat.columns(f)
        return [Hit(str(f), cols["label"][f.index], 1.0, (Match(str(f), "id"),), cols["max"][f.index],
                    cols["freq"][f.index])]
    words = list(dict.fromkeys(text_words(query)))
    if not words:
        raise ValueError(f"search query {query!r} has no searchable words (stop words and single letters "
                         "are ignored); type words such as 'wedding' or 'python code'")
    score: dict[tuple, float] = defaultdict(float)
    matched: dict[tuple, set[Match]] = defaultdict(set)
    related = cat.related()
    for site in sites:
        index = cat.site_index(site)
        for w in words:
            terms = [(stem(w), 1.0, "")] + [(stem(r), RELATED_WEIGHT * sim, r)
                                           for r, sim in related.get(w, ()) if stem(r) != stem(w)]
            best: dict[tuple, float] = {}  # (feature key, field) -> best term: related words do not add up
            for term, mult, rel in terms:
                for layer, i, fld, weight in index.get(term, ()):
                    if layer_set is not None and layer not in layer_set:
                        continue
                    key = (layer, site, i)
                    best[(key, fld)] = max(best.get((key, fld), 0.0), _FIELD_WEIGHT[fld] * weight * mult)
                    matched[key].add(Match(w, fld, rel))
            for (key, _), v in best.items():
                score[key] += v
    hits = []
    order = {w: n for n, w in enumerate(words)}  # reasons listed in query order
    for key, s in score.items():
        layer, site, i = key
        cols = cat.summary[(layer, site)]
        m = matched[key]
        coverage = len({x.word for x in m}) / len(words)
        specificity = 1.0 / (1.0 + 10.0 * cols["freq"][i])
        strong = any(x.field in _STRONG for x in m)
        why = tuple(sorted(m, key=lambda x: (order[x.word], x.field, x.related)))
        # a match in a label, top token or tag counts double, so the shown score is the ranking
        total = round(s * coverage * specificity * (2.0 if strong else 1.0), 4)
        hits.append((total, -cols["freq"][i],
                     Hit(f"{layer}/{site}/{i}", cols["label"][i], total, why, cols["max"][i], cols["freq"][i])))
    hits.sort(key=lambda h: (h[0], h[1]), reverse=True)
    return [h[2] for h in hits[:k]]
