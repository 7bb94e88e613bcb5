"""Seeded, batched generation of unsteered and steered variants (paper App. B settings).

Baseline and every steered variant of a request run in ONE ``model.generate`` call: each batch
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
from .sites import capture_sites
from .steer import SteerSpec, steering

ACTIVATION_PROMPT = "I think "
REMOVAL_PROMPT = "I think that the biggest problem of contemporary theoretical physics is "
TASK_DEFAULTS = {  # paper App. B.2 (activation) / B.1 (removal)
    "activate": {"prompt": ACTIVATION_PROMPT, "max_new_tokens": 36},
    "remove": {"prompt": REMOVAL_PROMPT, "max_new_tokens": 96},
}
TOP_P, TEMPERATURE = 0.7, 1.27  # paper App. B


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
    - ``instruction`` (the prompting baseline, issue 18): the instruction is the user turn and the
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

    ``variants`` maps a name to its specs (an empty list is the unsteered baseline). Row order:
    variant-major, seeds inner; sample j of every variant uses seed ``seeds[j]`` (paired draws:
    a zero-strength variant reproduces the baseline token for token). ``temperature=0`` decodes
    greedily. ``instruction`` makes every row the prompting baseline (`encode_prompt`).
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


@torch.no_grad()
def add_local_metrics(bundle, prompt_ids: list[int], gens: list[Generation], features: list) -> None:
    """Fill ``g.metrics`` for every generation, from one unsteered forward pass over
    prompt + text (right-padded batch):

    - perplexity: exp(mean NLL of the generated tokens given the prompt), unsteered model;
    - distinct_1/2/3: distinct n-gram ratios of the generated tokens (repetition);
    - feature_activation: {feature: mean SAE activation over the generated tokens}, read by
      the unsteered model from the text (how strongly the steered features fire on it).
    """
    keys = sorted({(f.layer, f.site) for f in features})
    n_p = len(prompt_ids)
    todo = [g for g in gens if g.token_ids]
    for g in gens:
        g.metrics = {"perplexity": None, "distinct_1": 1.0, "distinct_2": 1.0, "distinct_3": 1.0,
                     "feature_activation": {}, "n_tokens": len(g.token_ids)}
    if not todo:
        return
    width = n_p + max(len(g.token_ids) for g in todo)
    ids = torch.zeros(len(todo), width, dtype=torch.long)  # [b, seq], right-padded with token 0
    mask = torch.zeros(len(todo), width, dtype=torch.long)
    for i, g in enumerate(todo):
        ids[i, : n_p + len(g.token_ids)] = torch.tensor(prompt_ids + g.token_ids)
        mask[i, : n_p + len(g.token_ids)] = 1
    ids, mask = ids.to(bundle.device), mask.to(bundle.device)
    store: dict = {}
    n_new_max = width - n_p
    with bundle.lock, capture_sites({k: bundle.module(*k) for k in keys}, store):
        # logits only where generated tokens are predicted (positions n_p - 1 .. width - 2): the full
        # [b, seq, vocab] float logits of a 32-row, 640-token batch are 4 GB, and log_softmax doubles it
        logits = bundle.model(input_ids=ids, attention_mask=mask,
                              logits_to_keep=n_new_max + 1).logits[:, :n_new_max]  # [b, seq - n_p, vocab]
    new_mask = mask[:, n_p:].float()  # [b, seq - n_p]: 1 on generated tokens
    ppl = sequence_perplexity(logits, ids[:, n_p:], new_mask)  # [b]
    del logits
    acts = {}
    for f in features:
        z = bundle.encode(f.layer, f.site, store[(f.layer, f.site)][:, n_p:])[..., f.index]  # [b, seq - n_p]
        m = new_mask.to(z.device)  # the SAE may sit on another device (device_map)
        acts[str(f)] = ((z * m).sum(1) / m.sum(1)).tolist()  # [b]
    for i, g in enumerate(todo):
        g.metrics.update(perplexity=round(float(ppl[i]), 3),
                         distinct_1=round(distinct_n(g.token_ids, 1), 3),
                         distinct_2=round(distinct_n(g.token_ids, 2), 3),
                         distinct_3=round(distinct_n(g.token_ids, 3), 3),
                         feature_activation={k: round(v[i], 4) for k, v in acts.items()})


# ---- CLI: python -m steering steer ----------------------------------------------------------

def check_steer_cli(args) -> tuple[list[str], dict]:
    """Validate the steer options shared by ``steer`` and ``export`` (no model needed): the seed
    features and the checked numbers ``v`` (`limits.check_steer_args`)."""
    from .features import parse_feature
    from .steer import CONDITIONS, SCHEDULES

    seeds_f = [x.strip() for x in args.feature.split(",") if x.strip()]  # a seed set (paper App. B.1)
    if not seeds_f:
        raise ValueError("feature: give a feature id layer/site/index, or several separated by commas")
    for f in seeds_f:
        parse_feature(f)
    if len(seeds_f) > 1 and args.layer is not None:
        raise ValueError("--layer applies to one seed feature; with a seed set each graph uses its seed's layer")
    if args.mode not in CONDITIONS:
        raise ValueError(f"unknown --mode {args.mode!r}; valid: {', '.join(CONDITIONS)}")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {args.schedule!r}; valid: {', '.join(SCHEDULES)}")
    defaults = TASK_DEFAULTS[args.task]
    v = limits.check_steer_args(
        names={k: "--" + k.replace("_", "-") for k in ("strength", "alpha", "s_end", "r", "samples", "seed",
                                                          "max_new_tokens", "prompt", "temperature", "top_p")},
        strength=args.strength, alpha=args.alpha, s_end=args.s_end, r=args.r, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens or defaults["max_new_tokens"], temperature=args.temperature,
        top_p=args.top_p, prompt=defaults["prompt"] if args.prompt is None else args.prompt)
    return seeds_f, v


def steer_plan(bundle, args, seeds_f: list[str], v: dict) -> tuple[list, list[SteerSpec]]:
    """The flow graphs of the seed features and the union of their plans (a node shared by two
    graphs is steered once): what ``steer`` applies and ``export`` writes out."""
    from .features import parse_feature
    from .steer import plan

    graphs = []
    for f in seeds_f:
        if args.mode == "baseline":  # the seed feature alone: no flow graph needed
            from .graph import FlowGraph, FlowNode

            seed = parse_feature(f, bundle)
            graphs.append(FlowGraph(seed, [FlowNode(seed, 1.0, "seed")], [], seed.layer, seed.layer))
        else:
            from .flow import build_flow_graph  # lazy: the flow engine is heavier than generation

            graphs.append(build_flow_graph(bundle, f, t_res=args.t_res, t_module=args.t_module))
    remove = args.task == "remove"
    specs, seen = [], set()
    for graph in graphs:
        for s in plan(graph, args.mode, args.layer, v["r"] if remove else v["strength"], args.schedule, v["alpha"],
                      v["s_end"], mode="rescale" if remove else "add"):
            if s.feature not in seen:
                seen.add(s.feature)
                specs.append(s)
    return graphs, specs


def cmd_steer(args) -> dict:
    from .cli import load_bundle
    from .steer import schedule_table

    seeds_f, v = check_steer_cli(args)
    seeds = [v["seed"] + i for i in range(v["samples"])]
    limits.check_int("--seed + --samples - 1", seeds[-1], 0, limits.MAX_SEED)
    from .controls import generate_with_controls, parse_controls

    controls = parse_controls(args.controls)
    theme = limits.clean_text("--theme", args.theme, 300) if args.theme else ""
    if "prompt" in controls and not theme:
        raise ValueError("--controls prompt needs --theme (what the prompting baseline asks for)")
    bundle = load_bundle(args)
    graphs, specs = steer_plan(bundle, args, seeds_f, v)
    gens = generate_with_controls(bundle, v["prompt"], {"baseline": [], "steered": specs}, seeds, controls,
                                  theme, args.task, max_new_tokens=v["max_new_tokens"],
                                  temperature=v["temperature"], top_p=v["top_p"], chat=args.chat, check_cost=True,
                                  scope=args.scope)
    by = {name: [g for g in gens if g.variant == name] for name in dict.fromkeys(g.variant for g in gens)}
    one = len(seeds) == 1

    def texts(name):
        return by[name][0].text if one else [g.text for g in by[name]]

    out = {"prompt": v["prompt"], "feature": args.feature, "task": args.task, "mode": args.mode, "scope": args.scope,
           "baseline": texts("baseline"), "steered": texts("steered"),
           "schedule": schedule_table(specs, bundle), "seeds": seeds,
           "metrics": {name: [g.metrics for g in gs] for name, gs in by.items()},
           "flow": {"l_start": graphs[0].l_start, "l_end": graphs[0].l_end, "t_res": args.t_res,
                    "t_module": args.t_module,
                    "graphs": [{"seed": str(g.seed), "l_start": g.l_start, "l_end": g.l_end} for g in graphs]}}
    if controls:
        out["controls"] = {name: texts(name) for name in ("prompted", "random") if name in by}  # like baseline
    if theme:
        from .judging import make_judge

        judge = make_judge()
        out["theme"], out["judge"] = theme, judge.name
        out["scores"] = {}
        for name, gs in by.items():
            sc = judge.score([g.text for g in gs], theme, args.task,
                             perplexities=[g.metrics.get("perplexity") for g in gs])
            out["scores"][name] = [x.to_json() for x in sc]
    return out


def add_steer_args(p) -> None:
    """The steer options (feature, condition, strength, schedule, flow thresholds), shared by the
    ``steer`` and ``export`` subcommands."""
    p.add_argument("feature", help="seed feature id layer/site/index, e.g. 12/res/4111, or a seed set "
                   "separated by commas (their flow graphs are merged, as in the paper's removal)")
    p.add_argument("--task", default="activate", choices=list(TASK_DEFAULTS),
                   help="activate: add the features; remove: rescale them by --r (default: %(default)s)")
    p.add_argument("--mode", default="cumulative",
                   help="condition: baseline | single | cumulative (default: %(default)s)")
    p.add_argument("--layer", type=int, default=None, help="layer l (default: the seed's layer)")
    p.add_argument("--strength", type=float, default=3.0,
                   help=f"s, in multiples of the feature's typical activation (|s| <= {limits.MAX_ABS_STRENGTH:g})")
    p.add_argument("--schedule", default="exp", help="exp | linear | constant (cumulative only; default: %(default)s)")
    p.add_argument("--alpha", type=float, default=-0.25, help="exp schedule: s'(l) = s * e^(alpha * l)")
    p.add_argument("--s-end", type=float, default=1.0, help="linear schedule: s* at the graph's last layer l_end")
    p.add_argument("--r", type=float, default=0.0, help=f"--task remove: rescale factor (|r| <= {limits.MAX_ABS_R:g})")
    p.add_argument("--t-res", type=float, default=0.5,
                   help="flow graph: residual threshold t(R) (default: %(default)s)")
    p.add_argument("--t-module", type=float, default=0.15,
                   help="flow graph: MLP/attention threshold (default: %(default)s)")


def register(sub, common) -> None:
    p = sub.add_parser("steer", parents=[common], help="generate unsteered vs steered text (paper §5.3)")
    add_steer_args(p)
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    p.add_argument("--samples", type=int, default=1, help=f"samples per variant (<= {limits.MAX_SAMPLES})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: 36 (activate) or 96 (remove); <= {limits.MAX_NEW_TOKENS}")
    p.add_argument("--prompt", default=None, help="default: the task's prompt from the paper")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=TOP_P, help="(default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--theme", default="", help="judge every variant for this theme (OpenAI judge when "
                   "OPENAI_API_KEY is set, with OPENAI_BASE_URL for any compatible server; else the offline "
                   "fallback, labelled)")
    p.add_argument("--controls", default="", help="comma list of controls: prompt (ask the model for the "
                   "theme; needs --theme), random (norm-matched random directions)")
    p.add_argument("--scope", default="all", choices=["all", "prompt", "generated"],
                   help="which tokens are steered: all (the paper's setting), the prompt's, or the generated "
                   "ones (attention sinks never; default: %(default)s)")
    p.set_defaults(fn=cmd_steer)
