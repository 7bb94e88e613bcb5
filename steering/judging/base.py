"""What every judge shares: the `Judge` interface (one ``score()`` signature), the `Score` record,
the metric of paper §4.2 and argument checks.

Scores are scaled to [0, 1]; metric = behavioral x coherence for activation and
(1 - behavioral) x coherence for removal (paper §4.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from ..presets import ASSETS
from ..settings import TASKS, check_choice

Task = Literal["activate", "remove"]
JUDGE_DIR = ASSETS / "judge"
MAX_THEME_CHARS = 300


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
        held-out calibration errors (steering/judging/calibration.py); None for the LLM judge.
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
                 round(metric(task, b, c), 4), one_line(reason), offline=offline, label=label)


def unavailable(judge: str, task: str, theme: str, reason: str, offline: bool = False, label: str = "") -> Score:
    return Score(judge, task, theme, available=False, error=f"unavailable: {reason}", offline=offline, label=label)


def one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_args(texts: list[str], theme: str, task: str) -> str:
    """Validate a scoring request; returns the stripped theme."""
    check_choice("task", task, TASKS)
    if not isinstance(theme, str) or not theme.strip():
        raise ValueError("theme is empty; give the feature's label or your own words")
    if len(theme.strip()) > MAX_THEME_CHARS:
        raise ValueError(f"theme is too long ({len(theme.strip())} characters); allowed: at most {MAX_THEME_CHARS}")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    return " ".join(theme.split())



class Judge(Protocol):
    """Anything that scores texts for a theme.

    name: goes into every Score (e.g. "openai:gpt-4o-mini"); label: a human-readable note ("" for
    the LLM judge); offline: True for the local fallback (the UI says so). ``perplexities`` (one
    per text, under the unsteered model, or None) are passed by every caller; a judge that does
    not use them ignores them."""

    name: str
    label: str
    offline: bool

    def score(self, texts: list[str], theme: str, task: Task = "activate",
              perplexities: list[float | None] | None = None) -> list[Score]: ...
