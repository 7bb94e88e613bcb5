"""Seeded, batched generation of unsteered and steered variants (paper App. B settings).

Baseline and every steered variant of a request run in ONE ``model.generate`` call: each batch
row has its own steering delta (steer.steering) and its own torch.Generator. Batched sampling
would otherwise draw every row from one RNG, so a row's text would depend on its batch mates;
`PerRowSampler` samples each row with its own generator inside a LogitsProcessor and leaves
only the drawn token (greedy then picks it), so transformers still runs the loop and the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import limits
from .steer import SteerSpec, steering

ACTIVATION_PROMPT = "I think "
REMOVAL_PROMPT = "I think that the biggest problem of contemporary theoretical physics is "
TASK_DEFAULTS = {  # paper App. B.1 / B.2
    "activate": {"prompt": ACTIVATION_PROMPT, "max_new_tokens": 36},
    "remove": {"prompt": REMOVAL_PROMPT, "max_new_tokens": 96},
}
TOP_P, TEMPERATURE = 0.7, 1.27


class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one generator per row; returns logits that are -inf
    everywhere but the drawn token, so greedy decoding selects exactly the draw."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature  # [batch, vocab]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(-1).cpu()
        out = torch.full_like(scores, float("-inf"))
        for i, gen in enumerate(self.generators):
            j = torch.multinomial(probs[i], 1, generator=gen)
            out[i, order[i, j.to(order.device)]] = 0.0
        return out


@dataclass
class Generation:
    """One generated text. ``variant`` names the condition; ``metrics`` holds local signals."""

    variant: str
    seed: int
    text: str
    token_ids: list[int]
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def format_prompt(bundle, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(bundle.tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; turn the chat option off")
    return bundle.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)


def check_request(bundle, prompt: str, max_new_tokens: int, n_rows: int) -> str:
    """Validate a generation request before any compute (limits.py)."""
    prompt = limits.clean_text("prompt", prompt, limits.MAX_PROMPT_CHARS)
    limits.check_int("max_new_tokens", max_new_tokens, 1, limits.MAX_NEW_TOKENS)
    limits.check_int("number of rows (variants x samples)", n_rows, 1, limits.MAX_SAMPLES * 4)
    n_tok = len(bundle.tokenizer(prompt)["input_ids"])
    ctx = getattr(bundle.model.config, "max_position_embeddings", 10**9)
    if n_tok > limits.MAX_PROMPT_TOKENS or n_tok + max_new_tokens > ctx:
        allowed = min(limits.MAX_PROMPT_TOKENS, ctx - max_new_tokens)
        raise ValueError(f"prompt is {n_tok} tokens; allowed: at most {allowed}")
    return prompt


@torch.no_grad()
def generate_variants(bundle, prompt: str, variants: dict[str, list[SteerSpec]], seeds: list[int],
                      max_new_tokens: int = 36, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                      chat: bool = False, metrics: bool = True) -> list[Generation]:
    """Generate every variant for every seed in one batch.

    ``variants`` maps a name to its specs (an empty list is the unsteered baseline). Row order:
    variant-major, seeds inner; sample j of every variant uses seed ``seeds[j]`` (paired draws).
    ``temperature=0`` decodes greedily.
    """
    if not variants:
        raise ValueError("no variants to generate")
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    for s in seeds:
        limits.check_int("seed", s, 0, limits.MAX_SEED)
    limits.check_number("temperature", temperature, 10.0)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    rows = [(name, seed) for name in variants for seed in seeds]
    prompt = check_request(bundle, prompt, max_new_tokens, len(rows))
    text = format_prompt(bundle, prompt, chat)
    enc = bundle.tokenizer([text] * len(rows), return_tensors="pt", add_special_tokens=not chat)
    enc = {k: v.to(bundle.device) for k, v in enc.items()}
    specs = [variants[name] for name, _ in rows]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=bundle.tokenizer.pad_token_id,
                  top_p=None, top_k=None, temperature=None)
    if temperature > 0:
        gens = [torch.Generator().manual_seed(seed) for _, seed in rows]
        kwargs["logits_processor"] = LogitsProcessorList([PerRowSampler(gens, temperature, top_p)])
    with steering(bundle, specs, enc["attention_mask"]):
        out = bundle.model.generate(**enc, **kwargs)  # [rows, prompt + new]
    new = out[:, enc["input_ids"].shape[1]:]
    result = []
    for (name, seed), ids in zip(rows, new):
        ids = ids.tolist()
        if bundle.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(bundle.tokenizer.eos_token_id)]
        result.append(Generation(name, seed, bundle.tokenizer.decode(ids, skip_special_tokens=True), ids))
    if metrics:
        add_local_metrics(bundle, enc["input_ids"][0].tolist(), result,
                          {name: [s.feature for s in v] for name, v in variants.items()})
    return result


def distinct_n(ids: list[int], n: int) -> float:
    """Share of distinct n-grams among all n-grams (1.0 = no repetition)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.no_grad()
def add_local_metrics(bundle, prompt_ids: list[int], gens: list[Generation], features: dict) -> None:
    """Perplexity of each text under the unsteered model, repetition, and the activation of the
    steered features on the generated tokens (read by the unsteered model from the text)."""
    from .sites import capture_sites

    feats = sorted({f for fs in features.values() for f in fs})
    keys = sorted({(f.layer, f.site) for f in feats})
    for g in gens:
        if not g.token_ids:
            g.metrics = {"perplexity": None, "distinct_1": 1.0, "distinct_2": 1.0, "distinct_3": 1.0,
                         "feature_activation": {}, "n_tokens": 0}
            continue
        ids = torch.tensor([prompt_ids + g.token_ids], device=bundle.device)
        store: dict = {}
        with bundle.lock, capture_sites({k: bundle.module(*k) for k in keys}, store):
            logits = bundle.model(input_ids=ids).logits.float()
        n_p = len(prompt_ids)
        lp = logits[0, n_p - 1:-1].log_softmax(-1).gather(-1, ids[0, n_p:, None])  # [n_new, 1]
        acts = {}
        for f in feats:
            z = bundle.encode(f.layer, f.site, store[(f.layer, f.site)][0, n_p:])[:, f.index]  # [n_new]
            acts[str(f)] = round(float(z.mean()), 4)
        g.metrics = {"perplexity": round(float((-lp.mean()).exp()), 3),
                     "distinct_1": round(distinct_n(g.token_ids, 1), 3),
                     "distinct_2": round(distinct_n(g.token_ids, 2), 3),
                     "distinct_3": round(distinct_n(g.token_ids, 3), 3),
                     "feature_activation": acts, "n_tokens": len(g.token_ids)}
