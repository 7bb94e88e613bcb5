"""Feature labels: the offline rule (top tokens, shared context words, promoted tokens, tags) and
labels written by an LLM (gpt-4o-mini through the openai client, batched)."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from .words import STOP_WORDS, common_promoted, show_token, text_words, theme_words

log = logging.getLogger(__name__)
LLM_MODEL = "gpt-4o-mini"
DOMAIN_TAGS = {"code": ["code", "python", "programming"], "math": ["math", "mathematics"],
               "stories": ["story", "stories"]}


def token_tags(top: list[tuple[str, float]], domains: Counter) -> list[str]:
    """Tags from the top tokens' class and the contexts' domain (documented search aids):
    ``number`` when digits carry >= 50% of the top activation mass, ``punctuation``,
    ``newline/whitespace`` likewise; the domain (``code``, ``math``, ``stories``) when >= 80% of
    the top contexts come from it."""
    mass = defaultdict(float)
    for tok, share in top:
        t = tok.replace("\\n", "\n").strip()
        if not t:
            mass["whitespace"] += share
        elif t.isdigit():
            mass["number"] += share
        elif all(not ch.isalnum() for ch in t):
            mass["punctuation"] += share
    tags = [t for t, m in mass.items() if m >= 0.5]
    n = sum(domains.values())
    tags += [d for d, c in domains.items() if n and c / n >= 0.8 and d in DOMAIN_TAGS]
    return tags


def offline_label(top: list[tuple[str, float]], context_words: list[str], promoted: list[str],
                  tags: list[str]) -> str:
    """The offline label rule: ``tok1, tok2, tok3 · ctx: w1, w2 → p1, p2 [tags]``.

    - up to 3 top tokens (largest summed activation among the feature's top activations,
      stripped, whitespace shown quoted), distinct;
    - ``ctx:`` up to 3 words shared by >= 2 of its top contexts, most specific first (count x idf),
      not already among the tokens;
    - ``→`` up to 2 promoted tokens (logit lens) that are words of >= 3 letters, not shown yet;
    - tags in brackets. A feature that never fired is labelled ``(never fired)``.
    """
    if not top:
        return "(never fired)"
    toks = [t for t in dict.fromkeys(show_token(t) for t, _ in top) if t][:3]
    seen = {t.lower() for t in toks}
    ctx = [w for w in context_words if w not in seen][:3]
    seen |= set(ctx)
    out = [p.strip() for p in promoted if p.strip().isalpha() and len(p.strip()) >= 3]
    out = [p for p in dict.fromkeys(out) if p.lower() not in seen][:2]
    label = ", ".join(toks)
    label += f" · ctx: {', '.join(ctx)}" if ctx else ""
    label += f" → {', '.join(out)}" if out else ""
    return label + (f" [{', '.join(tags)}]" if tags else "")


FUNCTION_SHARE = 0.5  # see function_share
PLAIN_TAGS = {"punctuation": "punctuation", "whitespace": "spaces and line breaks", "number": "numbers"}


def function_share(top: list[tuple[str, float]]) -> float:
    """Share of a feature's listed top-token mass on tokens with no content word (punctuation,
    spaces, stop words such as 'the' or 'is', pieces such as "'s"): a feature at or above
    FUNCTION_SHARE fires on form, not on a topic (the text probe hides such features by default)."""
    total = sum(share for _, share in top)
    if total <= 0:
        return 0.0
    return sum(share for tok, share in top if not text_words(tok.replace("\\n", " "))) / total


def label_words(top: list[tuple[str, float]], context_words: list[str]) -> tuple[list[str], list[str]]:
    """The whole words of a readable label: up to 3 top tokens that start a word (>= 3 letters, no
    stop words), and up to 2 words its top contexts share that are not among them."""
    words = list({w.lower(): w for w in reversed(theme_words([t for t, _ in top], n=8)) if len(w) >= 3}.values())
    words = words[::-1][:3]
    seen = {w.lower() for w in words}
    return words, [w for w in context_words if w.isalpha() and len(w) >= 3 and w.lower() not in seen][:2]


def judge_theme(top: list[tuple[str, float]], context_words: list[str]) -> str:
    """A theme for the judge from the words of the feature's readable label (top words, else the
    words its contexts share); never word pieces or logit-lens tokens. "" when the label names only
    form (small words, punctuation, pieces: `function_share` >= FUNCTION_SHARE, or no word at all):
    the person then says what to look for."""
    if not top or function_share(top) >= FUNCTION_SHARE:
        return ""
    words, ctx = label_words(top, context_words)
    return ", ".join(words or ctx)


LENS_MIN_DEPTH = 0.5  # lens words only from the second half of the layers (see lens_words)


def lens_words(promoted: list[str], vocab: frozenset[str], common: set[str] = frozenset(), n: int = 2) -> list[str]:
    """Up to ``n`` whole English words among a feature's logit-lens tokens (``promoted``, strongest
    first): tokens that start a word, letters only, >= 4 letters, words of ``vocab`` (e.g. the
    MiniLM vocabulary, `embeddings.minilm_vocab`), not stop words, not in ``common``
    (`words.common_promoted`), lower-cased, distinct. Pieces such as 'athlet' or 'ution' are
    dropped. The logit lens reads a direction through the final norm and the unembedding, which
    means little in early layers, so callers use it from LENS_MIN_DEPTH of the depth on."""
    out: list[str] = []
    for tok in promoted:
        w = tok.strip().lower()
        if (tok[:1].isspace() and w.isalpha() and len(w) >= 4 and w in vocab and w not in STOP_WORDS
                and w not in common and w not in out):
            out.append(w)
    return out[:n]


def readable_label(top: list[tuple[str, float]], context_words: list[str], tags: list[str],
                   lens: list[str] = ()) -> str:
    """A label for a lay reader: whole words only (`label_words`: top tokens that start a word,
    then words its top contexts share), never word pieces. A feature that fires on form
    (`function_share`) is named by its tags ('punctuation', 'numbers') or as 'small words (is,
    had)', with the content words among its top tokens before it ('Olympic and small words (in,
    the)'); then ``lens`` (`lens_words`: whole words its direction makes the model say) is added as
    'pushing toward melodies, melody', since what such a feature steers toward is not in its input
    side (e.g. 27/res/402, which fires on 'a', 'of', 'in' in texts about instruments); a domain
    tag is said in words ('in code')."""
    words, ctx = label_words(top, context_words)
    domain = [f"in {t}" for t in tags if t in DOMAIN_TAGS]
    named = [PLAIN_TAGS[t] for t in tags if t in PLAIN_TAGS]
    form = function_share(top) >= FUNCTION_SHARE
    push = ""
    if not form and not words and ctx:
        main = f"texts with {', '.join(ctx)}"
    elif form or not words:
        small = [w for w in dict.fromkeys(t.strip().lower() for t, _ in top if not text_words(t))
                 if w.isalpha() and len(w) > 1][:3]
        main = " and ".join(named) or (f"small words ({', '.join(small)})" if small else "word pieces")
        if words and not named:  # a content word among the top tokens of a form feature: 'Olympic'
            main = f"{', '.join(words)} and {main}"
        push = f", pushing toward {', '.join(lens)}" if lens else ""
    else:
        main = ", ".join(words) + (f" (in texts with {', '.join(ctx)})" if ctx else "")
    return " ".join([main] + domain) + push



def relabel_offline(summary: dict[tuple[int, str], dict], site: str) -> None:
    """Recompute the offline labels of a site's features in place (LLM labels are kept); promoted
    words common to many features (`common_promoted`) are left out. Needs the DETAIL columns."""
    common = common_promoted(summary, site)
    for (_, s), cols in summary.items():
        if s != site:
            continue
        for i in range(len(cols["label"])):
            if cols["src"][i] != "l":
                out = [t for t in cols["out"][i] if not set(text_words(t)) & common]
                cols["label"][i] = offline_label([tuple(x) for x in cols["top"][i]],
                                                 [w for w, _ in cols["cw"][i]], out, cols["tags"][i])


LLM_SYSTEM = (
    "You name features of a sparse autoencoder trained on a small language model's activations. For each "
    "feature you get the tokens where it fires most strongly, a few text snippets with the strongest token "
    "marked [[like this]], and the tokens its direction promotes as next tokens. Reply with JSON "
    '{"labels": {"<id>": "<label>"}} giving every id a label of 2 to 6 words that names the concept or '
    'pattern (e.g. "wedding and marriage", "closing parenthesis in code", "years in dates"). '
    "Name the theme, not the literal token, when the snippets share one.")


def llm_item(fid: str, card) -> dict:
    """What the LLM sees of one feature (a `FeatureCard`): top tokens, snippets, promoted tokens."""
    snippets = []
    for c in card.contexts[:4]:
        toks = list(c["tokens"])
        toks[c["index"]] = f"[[{toks[c['index']]}]]"
        snippets.append("".join(toks).replace("\\n", " "))
    return {"id": fid, "top_tokens": card.top_tokens, "snippets": snippets, "promotes": card.promoted_tokens}


def llm_labels(items: list[dict], client, model: str = LLM_MODEL, batch: int = 20, workers: int = 4,
               progress: bool = False) -> dict[str, str]:
    """Labels from an LLM for ``items`` (``llm_item`` dicts), ``batch`` features per request,
    ``workers`` requests in flight. Failed requests are logged and their features keep their
    offline labels: the result holds only the ids the model labelled."""
    import openai

    def one(chunk: list[dict]) -> dict[str, str]:
        try:
            resp = client.chat.completions.create(
                model=model, temperature=0, response_format={"type": "json_object"},
                messages=[{"role": "system", "content": LLM_SYSTEM},
                          {"role": "user", "content": json.dumps(chunk, ensure_ascii=False)}])
            got = json.loads(resp.choices[0].message.content)["labels"]
            want = {it["id"] for it in chunk}
            return {k: " ".join(str(v).split())[:80] for k, v in got.items() if k in want and str(v).strip()}
        except (openai.OpenAIError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            log.warning("LLM labelling failed for %d features (%s: %s); they keep offline labels",
                        len(chunk), type(e).__name__, str(e)[:200])
            return {}

    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    out: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for got in tqdm(pool.map(one, chunks), total=len(chunks), desc="LLM labels", disable=not progress):
            out.update(got)
    return out

