"""Words of the catalog: tokenising text into searchable words, theme words, token display
strings, and related words (query expansion with the local sentence-embedding model)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch

RELATED_MIN_SIM = 0.55  # MiniLM cosine for a related word (wedding~bride 0.83, food~meal 0.80, food~flour 0.48)
N_RELATED = 12
RELATED_WEIGHT = 0.6  # a related word's match counts 0.6 x its similarity of an exact match
PROMOTED_MAX_DF = 0.005  # see common_promoted

WORD = re.compile(r"[a-z][a-z0-9']+|[0-9]+")
STOP_WORDS = frozenset(
    "the a an and or of to in on at for is are was were be been by with as it its this that these those from "
    "i you he she we they his her him our my your their them me us not no but if then so than too very can "
    "will would could should may might must shall do does did has have had having into onto over under out "
    "up down off about after before again all any both each few more most other some such only own same "
    "just also there here when where which while who whom what why how one ll re ve don isn wasn".split())


def text_words(text: str) -> list[str]:
    """Lower-case words of a text (letters/digits), stop words and 1-letter words dropped."""
    return [w for w in WORD.findall(text.lower()) if w not in STOP_WORDS and len(w) > 1]


def theme_words(top_tokens: Iterable[str], n: int = 4) -> list[str]:
    """Up to ``n`` words that name a feature's theme, from its top tokens: whole words only (tokens
    that start with a space), no stop words, single letters, digits or word pieces such as 'erve'."""
    out: list[str] = []
    for tok in top_tokens:
        word = tok.strip()
        if (tok[:1].isspace() and word.isalpha() and len(word) > 1 and word.lower() not in STOP_WORDS
                and word not in out):
            out.append(word)
    return out[:n]


def stem(word: str) -> str:
    """Tiny suffix stripper so 'weddings' finds 'wedding' and 'numbers' finds 'number'."""
    for suffix in ("ings", "ing", "ies", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4 and not word.endswith("ss"):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def token_strings(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Display string of each token id (byte-level and sentencepiece), newlines as ``\\n``."""
    out = {}
    for i in set(int(x) for x in ids):
        piece = tokenizer.convert_ids_to_tokens(i)
        text = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        if piece is not None and piece.startswith("▁") and not text.startswith(" "):
            text = " " + text
        out[i] = text.replace("\n", "\\n")
    return out


def token_pieces(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """The text split at token boundaries where it can be: ``[(text, [positions]), ...]``, newlines
    as ``\\n``. A character that byte-level BPE splits over several tokens (an emoji, an accented
    letter) would show as '\\ufffd' token by token; its tokens are decoded together into one piece.
    Pieces are differences of decoded prefixes, so they join to the decoded text."""
    out: list[tuple[str, list[int]]] = []
    ids = [int(x) for x in ids]
    done, start = "", 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):
            continue  # an incomplete UTF-8 sequence: take the next token too
        piece = text[len(done):] if text.startswith(done) else tokenizer.decode(ids[start:i + 1])
        out.append((piece.replace("\n", "\\n"), list(range(start, i + 1))))
        done, start = text, i + 1
    return out


def show_token(tok: str) -> str:
    """A token as a label shows it: stripped; a token of only whitespace as symbols (⏎ for a line
    break, ␣ for a space, ⇥ for a tab); a token holding part of a character (byte-level BPE
    splits emoji and accented letters, '\ufffd' alone) as '' (callers leave it out)."""
    if "\ufffd" in tok:
        return ""
    t = tok.strip()
    if t and t.replace("\\n", ""):
        return t
    return tok.replace("\\n", "⏎").replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣") or "␣"


# ---- related words (query expansion) ----------------------------------------------------------

def catalog_words(summary: dict[tuple[int, str], dict]) -> list[str]:
    """Whole words a query can meet in the catalog, to find related words for: context words
    (whole by construction), LLM-label words, and top / promoted tokens that start a word (leading
    space; a piece like 'angerous' of ' dangerous' is left out); alphabetic, >= 3 letters."""
    out = set()
    for cols in summary.values():
        for i in range(len(cols["label"])):
            texts = [w for w, _ in cols["cw"][i]] + [cols["label"][i]] * (cols["src"][i] == "l")
            texts += [t for t, _ in cols["top"][i] if t.startswith(" ")]
            texts += [t for t in cols["out"][i] if t.startswith(" ")]
            out.update(w for t in texts for w in text_words(t) if w.isalpha() and len(w) >= 3)
    return sorted(out)


def common_promoted(summary: dict[tuple[int, str], dict], site: str) -> set[str]:
    """Words among the promoted tokens of more than PROMOTED_MAX_DF (and 10) of a site's features. The raw
    logit lens of a small model favours a few high-norm word pieces (' strugg', ' affili') for
    thousands of directions; such words say nothing about any one feature, so labels and search
    skip them."""
    df: Counter = Counter()
    n = 0
    for (_, s), cols in summary.items():
        if s == site:
            for out in cols["out"]:
                n += 1
                df.update({w for t in out for w in text_words(t)})
    return {w for w, c in df.items() if c > max(PROMOTED_MAX_DF * n, 10)}



def related_words(words: list[str], query_words: list[str], embed, min_sim: float = RELATED_MIN_SIM,
                  n: int = N_RELATED, chunk: int = 2048) -> dict[str, list[tuple[str, float]]]:
    """For every query-side word (``query_words`` and ``words``), the catalog ``words`` whose
    embeddings have cosine >= min_sim with it (at most n, strongest first, same stem excluded).
    ``embed(list[str]) -> [n, d]`` unit-norm float tensor."""
    words = sorted(set(words))
    extra = sorted(set(query_words) - set(words))
    E = embed(words).float()  # [n_words, d]
    Q = torch.cat([E, embed(extra).float()]) if extra else E  # [n_query, d]
    queries = words + extra
    out: dict[str, list[tuple[str, float]]] = {}
    for start in range(0, len(queries), chunk):
        sims = Q[start:start + chunk] @ E.T  # [chunk, n_words]
        val, idx = sims.topk(min(n + 4, len(words)), dim=-1)
        for q, vs, js in zip(queries[start:start + chunk], val.tolist(), idx.tolist()):
            rel = [(words[j], round(v, 2)) for v, j in zip(vs, js) if v >= min_sim and stem(words[j]) != stem(q)]
            if rel:
                out[q] = rel[:n]
    return out


def minilm_embedder():
    """``(embed, vocabulary)`` from the offline MiniLM (`steering.embeddings`, shared with the
    judge): embed(list[str]) -> unit-norm [n, 384]; vocabulary = its whole alphabetic words of >= 3
    letters (the query side of ``related_words``)."""
    from .. import embeddings

    embeddings.minilm()  # load now: a missing model is reported before any work

    def embed(texts: list[str]) -> torch.Tensor:
        return embeddings.embed(texts, batch_size=512)

    vocab = [w for w in (embeddings.minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split()
             if w.isalpha() and len(w) >= 3]
    return embed, vocab
