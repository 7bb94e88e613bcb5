"""The LLM judge (paper §4.2, App. B): gpt-4o-mini by default, any OpenAI-compatible server through
OPENAI_BASE_URL; each text is scored 0-5 for theme presence ("behavioral") and coherence, as JSON."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from .base import Score, Task, check_args, make_score, unavailable
from .prompts import RESPONSE_FORMAT, RESPONSE_FORMAT_FALLBACK, system_prompt

log = logging.getLogger(__name__)
DEFAULT_MODEL = "gpt-4o-mini"


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
    offline = False

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

    def score(self, texts: list[str], theme: str, task: Task = "activate",
              perplexities: list[float | None] | None = None) -> list[Score]:
        """Scores of ``texts`` (``perplexities`` are not used: the LLM reads coherence from the text)."""
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

        phrases = ((openai.AuthenticationError, "the API key was rejected (401)"),
                   (openai.PermissionDeniedError, "the API key may not use this model (403)"),
                   (openai.NotFoundError, "unknown model or endpoint (404)"),
                   (openai.RateLimitError, "rate limited (429) after retries"),
                   (openai.APITimeoutError, "the judge timed out after retries"),  # before its base class
                   (openai.APIConnectionError, "could not reach the judge server"))
        for kind, phrase in phrases:
            if isinstance(e, kind):
                return phrase
        if isinstance(e, openai.APIStatusError):
            return f"the judge server answered {e.status_code}"
        return f"judge error ({type(e).__name__})"

