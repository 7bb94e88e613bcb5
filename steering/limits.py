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
MAX_ABS_R = 64.0  # theme removal factor r (paper App. B.1 sweeps 0, -1, ..., -64)
MAX_TEMPERATURE = 10.0
MAX_ROWS = 4 * MAX_SAMPLES  # rows of one batched generation (variants x samples)
MAX_QUEUE = int(os.environ.get("FFP_MAX_QUEUE", 32))
# One request's cost in token-rows: rows (variants x samples, controls included) x (prompt tokens
# as the model sees them + new tokens). The 2-core default runs ~150 token-rows per second
# (a request of 16 rows x 628 tokens took 62-68 s), so 4,096 keeps one request near 30 s and
# bounds how long the next user in the queue waits (issue 20; `python -m steering bench`).
MAX_COST = int(os.environ.get("FFP_MAX_COST", 4096))
# Model requests the app runs at once: concurrent /steer requests with the same prompt and
# settings are merged into one batch (`steering.batching`); others take turns on the model lock.
MODEL_CONCURRENCY = int(os.environ.get("FFP_MODEL_CONCURRENCY", 4))
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


def check_steer_args(names: dict[str, str] | None = None, **values) -> dict:
    """Validate steering/generation parameters before any compute; returns the cleaned values.

    Known fields: strength, s_end, alpha, r, temperature, top_p, max_new_tokens, samples, seed,
    prompt. ``None`` values are skipped. ``names`` maps a field to the name shown in errors
    (e.g. ``{"strength": "--strength"}`` for the CLI).
    """
    names = names or {}
    numbers = {"strength": MAX_ABS_STRENGTH, "s_end": MAX_ABS_STRENGTH, "alpha": MAX_ABS_ALPHA, "r": MAX_ABS_R}
    ints = {"max_new_tokens": (1, MAX_NEW_TOKENS), "samples": (1, MAX_SAMPLES), "seed": (0, MAX_SEED)}
    out = {}
    for field, value in values.items():
        name = names.get(field, field)
        if value is None:
            out[field] = None
        elif field in numbers:
            out[field] = check_number(name, value, numbers[field])
        elif field in ints:
            out[field] = check_int(name, value, *ints[field])
        elif field == "temperature":
            out[field] = check_number(name, value, MAX_TEMPERATURE)
            if out[field] < 0:
                raise ValueError(f"{name} = {value:g} is out of range; allowed: 0..{MAX_TEMPERATURE:g} (0 = greedy)")
        elif field == "top_p":
            out[field] = check_number(name, value, 1.0)
            if out[field] <= 0:
                raise ValueError(f"{name} = {value:g} is out of range; allowed: (0, 1]")
        elif field == "prompt":
            out[field] = clean_text(name, value, MAX_PROMPT_CHARS)
        else:
            known = [*numbers, *ints, "temperature", "top_p", "prompt"]
            raise ValueError(f"unknown field {field!r}; valid: {', '.join(known)}")
    return out


def check_cost(n_rows: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """The request's cost in token-rows (see MAX_COST); ValueError naming the parts when over."""
    cost = n_rows * (prompt_tokens + max_new_tokens)
    if cost > MAX_COST:
        raise ValueError(
            f"request too large: {n_rows} rows (variants x samples, controls included) x ({prompt_tokens} prompt "
            f"+ {max_new_tokens} new tokens) = {cost} token-rows; allowed: at most {MAX_COST}. Use fewer samples, "
            "fewer new tokens, a shorter prompt or fewer controls")
    return cost


def limits_table() -> dict:
    """The limits as shown in the UI and the README."""
    return {"max_new_tokens": MAX_NEW_TOKENS, "max_samples": MAX_SAMPLES, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_prompt_chars": MAX_PROMPT_CHARS, "max_abs_strength": MAX_ABS_STRENGTH,
            "max_abs_alpha": MAX_ABS_ALPHA, "max_abs_r": MAX_ABS_R, "max_rows": MAX_ROWS,
            "max_queue": MAX_QUEUE, "max_cost_token_rows": MAX_COST,
            "model_concurrency": MODEL_CONCURRENCY}
