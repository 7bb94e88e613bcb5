"""Request limits, in one place (issue 11): the CLI, the library boundary and the app use these.

Every check raises ValueError naming the field and the allowed range, before any compute.
"""

from __future__ import annotations

import math
import os
import unicodedata

MAX_NEW_TOKENS = int(os.environ.get("FFP_MAX_NEW_TOKENS", 128))
MAX_SAMPLES = int(os.environ.get("FFP_MAX_SAMPLES", 8))
MAX_PROMPT_TOKENS = int(os.environ.get("FFP_MAX_PROMPT_TOKENS", 512))
MAX_PROMPT_CHARS = 4000
MAX_QUERY_CHARS = 200
MAX_ABS_STRENGTH = 200.0
MAX_ABS_ALPHA = 5.0
MAX_QUEUE = int(os.environ.get("FFP_MAX_QUEUE", 32))
MAX_SEED = 2**31 - 1


def check_number(name: str, value, max_abs: float) -> float:
    """A finite number with |value| <= max_abs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}; allowed: -{max_abs:g}..{max_abs:g}")
    if abs(value) > max_abs:
        raise ValueError(f"{name} = {value:g} is out of range; allowed: -{max_abs:g}..{max_abs:g}")
    return float(value)


def check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} = {value} is out of range; allowed: {lo}..{hi}")
    return value


def clean_text(name: str, text, max_chars: int, allow_empty: bool = False) -> str:
    """Text with control characters (except newline and tab) removed and NFC-normalized."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if not allow_empty and not text.strip():
        raise ValueError(f"{name} is empty; type some text")
    if len(text) > max_chars:
        raise ValueError(f"{name} is too long ({len(text)} characters); allowed: at most {max_chars}")
    return text


def limits_table() -> dict:
    """The limits as shown in the UI and the README."""
    return {"max_new_tokens": MAX_NEW_TOKENS, "max_samples": MAX_SAMPLES, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_prompt_chars": MAX_PROMPT_CHARS, "max_abs_strength": MAX_ABS_STRENGTH,
            "max_abs_alpha": MAX_ABS_ALPHA, "max_queue": MAX_QUEUE}
