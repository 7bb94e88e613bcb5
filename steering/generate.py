"""Seeded, batched generation of unsteered and steered variants (paper App. B settings).

The unsteered rows and every steered variant of a request run in ONE ``model.generate`` call: each batch
row has its own steering delta (steer.steering) and its own torch.Generator. Batched sampling
would otherwise draw every row from one RNG, so a row's text would depend on its batch mates;
`PerRowSampler` samples each row with its own generator inside a LogitsProcessor and leaves
only the drawn token (greedy then picks it), so transformers still runs the loop and the cache.

Local quality signals (no API): perplexity of the generated text under the unsteered model,
distinct-1/2/3 n-gram ratios, and the mean SAE activation of the steered features on the
generated tokens, all from one extra batched forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from . import limits
from .metrics import distinct_n, sequence_perplexity
from .settings import TEMPERATURE, TOP_P
from .sites import capture_sites
from .steer import SteerSpec, steering



class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one generator per row; returns logits that are -inf
    everywhere but the drawn token, so greedy decoding selects exactly the draw."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"PerRowSampler has {len(self.generators)} generators for {scores.shape[0]} rows")
        logits = scores.float() / self.temperature  # [batch, vocab]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest prefix with mass >= top_p
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1).cpu()  # [batch, vocab]
        out = torch.full_like(scores, float("-inf"))
        for i, gen in enumerate(self.generators):
            j = int(torch.multinomial(probs[i], 1, generator=gen))
            out[i, order[i, j]] = 0.0
        return out


class RowStreamer(BaseStreamer):
    """Streams a batched generation (issue 17): after every decoding step, ``callback(names,
    rows)`` gets each row's (variant, seed) and its new token ids so far (rows go on past EOS with
    padding; the reader cuts at EOS). The first ``put`` is the prompt and is skipped."""

    def __init__(self, names: list[tuple[str, int]], callback: Callable):
        self.names, self.callback = names, callback
        self.rows: list[list[int]] = [[] for _ in names]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        new = value.reshape(len(self.rows), -1)[:, -1].tolist()  # [rows]: this step's token of every row
        for row, t in zip(self.rows, new):
            row.append(int(t))
        self.callback(self.names, self.rows)

    def end(self) -> None:
        pass


@dataclass
class Generation:
    """One generated text. ``variant`` names the condition; ``token_ids`` are the new tokens up
    to (not including) EOS; ``metrics`` holds the local quality signals."""

    variant: str
    seed: int
    text: str
    token_ids: list[int]
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def format_prompt(bundle, prompt: str, chat: bool) -> str:
    """The prompt as the model sees it: raw, or wrapped in the tokenizer's chat template."""
    if not chat:
        return prompt
    if not getattr(bundle.tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; turn the chat option off")
    return bundle.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)


_SLOT = "\x00FFP-USER-TEXT\x00"


def encode_prompt(bundle, prompt: str, chat: bool = False, instruction: str | None = None) -> list[int]:
    """Token ids the model sees for a prompt (paper App. B prompts are raw continuations).

    - ``chat``: the prompt is the user turn of the chat template.
    - ``instruction`` (the prompting control, issue 18): the instruction is the user turn and the
      prompt starts the assistant's reply (raw ``instruction\n\nprompt`` without a template).
    Text the user typed stays text: a typed ``<|im_start|>`` is tokenised as characters, never
    as the control token (no forged turns); only the template's own markup is special.
    """
    tok = bundle.tokenizer

    def user_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def bos() -> list[int]:
        probe = tok("a")["input_ids"]
        return [tok.bos_token_id] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []

    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise ValueError("this model has no chat template; turn the chat option off")
    if instruction is None and not chat:
        return bos() + user_ids(prompt)
    if instruction is not None and not has_template:
        return bos() + user_ids(instruction) + user_ids("\n\n" + prompt)
    content = instruction if instruction is not None else prompt
    rendered = tok.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                       add_generation_prompt=True)
    before, after = rendered.split(_SLOT)
    ids = (tok(before, add_special_tokens=False)["input_ids"] + user_ids(content)
           + tok(after, add_special_tokens=False)["input_ids"])
    return ids + (user_ids(prompt) if instruction is not None and prompt else [])


def check_request(bundle, prompt: str, max_new_tokens: int, n_rows: int, chat: bool = False,
                  instruction: str | None = None) -> tuple[str, list[int]]:
    """Validate a generation request before any compute (limits.py); returns the cleaned prompt
    and the token ids the model will see (the limit counts those, template included)."""
    prompt = limits.check_steer_args(prompt=prompt, max_new_tokens=max_new_tokens)["prompt"]
    limits.check_int("number of rows (variants x samples)", n_rows, 1, limits.MAX_ROWS)
    ids = encode_prompt(bundle, prompt, chat, instruction)
    n_tok = len(ids)
    ctx = getattr(bundle.model.config, "max_position_embeddings", 10**9)
    if n_tok > limits.MAX_PROMPT_TOKENS or n_tok + max_new_tokens > ctx:
        allowed = min(limits.MAX_PROMPT_TOKENS, ctx - max_new_tokens)
        raise ValueError(f"prompt is {n_tok} tokens as the model sees it; allowed: at most {allowed}")
    return prompt, ids


@torch.no_grad()
def generate_variants(bundle, prompt: str, variants: dict[str, list[SteerSpec]], seeds: list[int],
                      max_new_tokens: int = 36, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                      chat: bool = False, metrics: bool = True, instruction: str | None = None,
                      on_tokens: Callable | None = None, scope: str = "all") -> list[Generation]:
    """Generate every variant for every seed in one batch (paper App. B sampling settings).

    ``variants`` maps a name to its specs (an empty list is unsteered). Row order:
    variant-major, seeds inner; sample j of every variant uses seed ``seeds[j]`` (paired draws:
    a zero-strength variant reproduces the unsteered text token for token). ``temperature=0`` decodes
    greedily. ``instruction`` makes every row the prompting control (`encode_prompt`).
    ``on_tokens`` streams the rows while they are generated (`RowStreamer`). ``scope``: which
    token positions are steered (`steer.steering`: all, prompt or generated).
    ``bundle.lock`` is held for the whole call.
    """
    if not variants:
        raise ValueError("no variants to generate")
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    rows = [(name, seed, variants[name]) for name in variants for seed in seeds]
    return generate_rows(bundle, prompt, rows, max_new_tokens, temperature, top_p, chat, metrics, instruction,
                         on_tokens, scope)


@torch.no_grad()
def generate_rows(bundle, prompt: str, rows: list[tuple[str, int, list[SteerSpec]]], max_new_tokens: int = 36,
                  temperature: float = TEMPERATURE, top_p: float = TOP_P, chat: bool = False, metrics: bool = True,
                  instruction: str | None = None, on_tokens: Callable | None = None,
                  scope: str = "all") -> list[Generation]:
    """One batched generation of arbitrary rows (variant name, seed, specs), in row order; what
    `generate_variants` and the request batcher (`steering.batching`) run. Every row has its own
    sampler seed and steering, so a row's text does not depend on its batch mates."""
    for _, s, _ in rows:
        limits.check_int("seed", s, 0, limits.MAX_SEED)
    limits.check_steer_args(temperature=temperature, top_p=top_p)
    prompt, ids = check_request(bundle, prompt, max_new_tokens, len(rows), chat, instruction)
    tok = bundle.tokenizer
    input_ids = torch.tensor([ids] * len(rows), device=bundle.device)  # same prompt in every row: no padding
    enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    specs = [r[2] for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                  top_p=None, top_k=None, temperature=None)
    if temperature > 0:
        gens = [torch.Generator().manual_seed(seed) for _, seed, _ in rows]
        kwargs["logits_processor"] = LogitsProcessorList([PerRowSampler(gens, temperature, top_p)])
    if on_tokens is not None:
        kwargs["streamer"] = RowStreamer([(name, seed) for name, seed, _ in rows], on_tokens)
    with bundle.lock:
        with steering(bundle, specs, enc["attention_mask"], scope):
            out = bundle.model.generate(**enc, **kwargs)  # [rows, prompt + new]
        new = out[:, enc["input_ids"].shape[1]:]  # [rows, <= max_new_tokens]
        result = []
        for (name, seed, _), ids in zip(rows, new.tolist()):
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            result.append(Generation(name, seed, tok.decode(ids, skip_special_tokens=True), ids))
        if metrics:
            feats = sorted({s.feature for r in rows for s in r[2]})
            add_local_metrics(bundle, enc["input_ids"][0].tolist(), result, feats)
    return result


METRIC_ROWS = 4  # rows per unsteered forward of the local metrics (bounds the logits' memory)


@torch.no_grad()
def add_local_metrics(bundle, prompt_ids: list[int], gens: list[Generation], features: list) -> None:
    """Fill ``g.metrics`` for every generation, from one unsteered forward pass over
    prompt + text (right-padded batch):

    - perplexity: exp(mean NLL of the generated tokens given the prompt), unsteered model;
    - distinct_1/2/3: distinct n-gram ratios of the generated tokens (repetition);
    - feature_activation: {feature: mean SAE activation over the generated tokens}, read by
      the unsteered model from the text (how strongly the steered features fire on it; for a
      feature steered alone at its own layer this equals its activation in the steered pass before
      the edit, as nothing below that layer is changed). 0 is a real reading, not a missing one:
      with a TopK SAE the feature was not among the top k at any generated token;
    - feature_active_tokens: {feature: how many generated tokens it fires on (activation > 0)}.
    """
    keys = sorted({(f.layer, f.site) for f in features})
    n_p = len(prompt_ids)
    todo = [g for g in gens if g.token_ids]
    for g in gens:
        g.metrics = {"perplexity": None, "distinct_1": 1.0, "distinct_2": 1.0, "distinct_3": 1.0,
                     "feature_activation": {}, "feature_active_tokens": {}, "n_tokens": len(g.token_ids)}
    if not todo:
        return
    width = n_p + max(len(g.token_ids) for g in todo)
    ids = torch.zeros(len(todo), width, dtype=torch.long)  # [b, seq], right-padded with token 0
    mask = torch.zeros(len(todo), width, dtype=torch.long)
    for i, g in enumerate(todo):
        ids[i, : n_p + len(g.token_ids)] = torch.tensor(prompt_ids + g.token_ids)
        mask[i, : n_p + len(g.token_ids)] = 1
    ids, mask = ids.to(bundle.device), mask.to(bundle.device)
    n_new_max = width - n_p
    new_mask = mask[:, n_p:].float()  # [b, seq - n_p]: 1 on generated tokens
    ppl_parts: list[torch.Tensor] = []
    acts: dict[str, list[float]] = {str(f): [] for f in features}
    active: dict[str, list[int]] = {str(f): [] for f in features}
    with bundle.lock:
        # A few rows per forward: the float logits at the generated positions of a 24-row,
        # 128-token request are 24 x 129 x 49,152 x 4 bytes = 0.6 GB at once otherwise (issue 20).
        # Logits only where generated tokens are predicted (positions n_p - 1 .. width - 2).
        for i in range(0, len(todo), METRIC_ROWS):
            rows = slice(i, i + METRIC_ROWS)
            store: dict = {}
            with capture_sites({k: bundle.module(*k) for k in keys}, store):
                logits = bundle.model(input_ids=ids[rows], attention_mask=mask[rows],
                                      logits_to_keep=n_new_max + 1).logits[:, :n_new_max]  # [r, seq - n_p, vocab]
            ppl_parts.append(sequence_perplexity(logits, ids[rows, n_p:], new_mask[rows]))  # [r]
            del logits
            for f in features:
                z = bundle.encode(f.layer, f.site, store[(f.layer, f.site)][:, n_p:])[..., f.index]  # [r, seq - n_p]
                m = new_mask[rows].to(z.device)  # the SAE may sit on another device (device_map)
                acts[str(f)] += ((z * m).sum(1) / m.sum(1)).tolist()
                active[str(f)] += ((z > 0).float() * m).sum(1).long().tolist()
    ppl = torch.cat(ppl_parts)  # [b]
    for i, g in enumerate(todo):
        g.metrics.update(perplexity=round(float(ppl[i]), 3),
                         distinct_1=round(distinct_n(g.token_ids, 1), 3),
                         distinct_2=round(distinct_n(g.token_ids, 2), 3),
                         distinct_3=round(distinct_n(g.token_ids, 3), 3),
                         feature_activation={k: round(v[i], 4) for k, v in acts.items()},
                         feature_active_tokens={k: v[i] for k, v in active.items()})
