"""Theme and coherence scoring of generations (paper §4.2, App. B).

- `steering.judging.base`: the `Judge` interface (one ``score(texts, theme, task, perplexities)``
  signature), `Score` and the metric.
- `steering.judging.openai`: `OpenAIJudge`, an LLM (gpt-4o-mini by default; any OpenAI-compatible
  server through OPENAI_BASE_URL) with the prompts of `steering.judging.prompts`.
- `steering.judging.offline`: `OfflineJudge`, the labelled local fallback (calibrated MiniLM
  similarity + local coherence signals), fitted by `steering.judging.calibration`
  (``python -m steering judge calibrate``).

`make_judge` picks the LLM judge when a key is given, else the offline fallback.
"""

from __future__ import annotations

import logging
import os

from ..metrics import PerplexityFn
from .base import TASKS, Judge, Score, Task, unavailable
from .offline import OfflineJudge, ThemeLogRatioFn, bundle_theme_logratio_fn
from .openai import DEFAULT_MODEL, OpenAIJudge

log = logging.getLogger(__name__)
__all__ = ["TASKS", "Judge", "OfflineJudge", "OpenAIJudge", "Score", "Task", "bundle_theme_logratio_fn", "make_judge",
           "unavailable"]


def make_judge(api_key: str | None = None, model: str | None = None, base_url: str | None = None, client=None,
               perplexity_fn: PerplexityFn | None = None, theme_logratio_fn: ThemeLogRatioFn | None = None) -> Judge:
    """The LLM judge when a key (argument, else OPENAI_API_KEY) or a client is given, else the
    labelled offline fallback (with ``perplexity_fn`` and ``theme_logratio_fn``: `OfflineJudge`).
    ``base_url`` defaults to OPENAI_BASE_URL (any compatible server; one without auth still needs
    OPENAI_API_KEY set to some value)."""
    key = (api_key or "").strip() or os.environ.get("OPENAI_API_KEY", "").strip()
    if client is not None or key:
        # a local OpenAI-compatible server without auth: set OPENAI_API_KEY to any value
        return OpenAIJudge(api_key=key or None, model=model or DEFAULT_MODEL,
                           base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None, client=client)
    log.info("no OpenAI key: using the offline judge")
    return OfflineJudge(perplexity_fn=perplexity_fn, theme_logratio_fn=theme_logratio_fn)
