"""The settings of one steered run, in one place: names, defaults, and `SteerSettings`, validated once
at the boundary (the CLI, the app's form and API) and written into the run record.

Words used everywhere (UI, CLI, JSON, docs):
- **unsteered**: the text generated with no edit at all;
- **condition**: which features are steered (paper §5.3): ``seed-only`` (the seed feature alone),
  ``single`` (the flow graph's nodes at layer l), ``cumulative`` (its nodes from l_start to l);
- **edit mode**: how a feature is edited, ``add`` (activation, strength s) or ``rescale`` (theme
  removal, factor r); it follows from the task (activate / remove);
- **generation prompt**: the text the model continues (`TASK_DEFAULTS`); the judge's prompts are
  in `steering.judging.prompts`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

from . import limits
from .features import FeatureId, parse_feature

log = logging.getLogger(__name__)

# ---- defaults (paper App. B) -------------------------------------------------------------------
T_RES = 0.5  # flow graph: residual threshold t(R): the span keeps links with cosine >= t(R) (App. B.2)
T_MODULE = 0.15  # flow graph: MLP/attention threshold t(M/A)
STRENGTH = 3.0  # s, in multiples of the feature's typical activation
ALPHA = -0.25  # exp schedule s'(l) = s * e^(alpha * l) (App. C.3)
S_END = 1.0  # linear schedule: s* at the graph's last layer l_end
R = 0.0  # removal: rescale factor r (0 erases the feature, App. B.1)
TOP_P, TEMPERATURE = 0.7, 1.27  # sampling (App. B)
ACTIVATION_PROMPT = "I think "  # generation prompts (App. B.2 activation, B.1 removal)
REMOVAL_PROMPT = "I think that the biggest problem of contemporary theoretical physics is "
TASK_DEFAULTS = {
    "activate": {"prompt": ACTIVATION_PROMPT, "max_new_tokens": 36},
    "remove": {"prompt": REMOVAL_PROMPT, "max_new_tokens": 96},
}
# The app's prompts: the paper's without the trailing space. SmolLM2's tokenizer makes a bare
# trailing space its own token, and about half of the samples after it begin with a digit ("I think
# 1.5 ..."; session 10's prompt scan, docs/results.md); the curated examples were measured on these.
APP_PROMPTS = {task: d["prompt"].rstrip() for task, d in TASK_DEFAULTS.items()}

# ---- names -------------------------------------------------------------------------------------
TASKS = tuple(TASK_DEFAULTS)
CONDITIONS = ("seed-only", "single", "cumulative")
DEPRECATED_CONDITIONS = {"baseline": "seed-only"}  # old name, accepted with a warning for one release
_warned: set[str] = set()
SCHEDULES = ("exp", "linear", "constant")
SCOPES = ("all", "prompt", "generated")  # token scope of an edit (`steer.steering`)
EDIT_MODES = ("add", "rescale")
CONTROLS = ("prompt", "random")


def check_choice(name: str, value, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of ``valid``, else ValueError naming the field and the choices."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    return value


def check_condition(condition, name: str = "condition") -> str:
    """A condition name; the old name ``baseline`` (the seed-only condition) still works, with a warning."""
    if condition in DEPRECATED_CONDITIONS:
        new = DEPRECATED_CONDITIONS[condition]
        if condition not in _warned:  # once per process: callers in loops would repeat it
            _warned.add(condition)
            log.warning("condition %r is deprecated; use %r (the old name goes in the next release)", condition, new)
        return new
    return check_choice(name, condition, CONDITIONS)


def check_strength(value, edit_mode: str = "add", name: str | None = None) -> float:
    """The strength of an edit: s (``add``, |s| <= MAX_ABS_STRENGTH) or r (``rescale``, |r| <= MAX_ABS_R)."""
    if edit_mode == "rescale":
        return limits.check_number(name or "r", value, limits.MAX_ABS_R)
    return limits.check_number(name or "strength", value, limits.MAX_ABS_STRENGTH)


def parse_controls(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"prompt,random"`` (or a list) -> ("prompt", "random"); empty -> (); names checked."""
    if not text:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    out = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    bad = [c for c in out if c not in CONTROLS]
    if bad:
        raise ValueError(f"unknown control(s) {', '.join(bad)}; valid: {', '.join(CONTROLS)}")
    return out


def node_ids(value) -> tuple[str, ...]:
    """Node ids from a list (API / multiselect) or a comma-separated string."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).replace(";", ",").split(",")
    return tuple(str(x).strip() for x in items if str(x).strip())


@dataclass(frozen=True)
class SteerSettings:
    """Everything that defines a steered run; build it with `create` (validated, defaults filled).

    Fields:
        features: the seed feature(s) (a seed set merges its flow graphs, paper App. B.1).
        task: ``activate`` (edit mode ``add``, strength s) or ``remove`` (``rescale``, factor r).
        condition: ``seed-only`` | ``single`` | ``cumulative``; layer: l (None: the seed's layer).
        strength, schedule, alpha, s_end: s and its schedule over layers (cumulative only); r: removal.
        t_res, t_module: flow-graph thresholds t(R), t(M/A).
        exclude, include: node ids taken out of / added to the plan.
        seed, samples: sample i uses seed + i; max_new_tokens, prompt: the task's by default.
        temperature, top_p, chat: sampling and the chat template.
        theme: what the judge looks for ("" = unscored); controls: ``prompt`` / ``random``.
        scope: which token positions are edited (all, prompt, generated); compare: also the other
            condition (single vs cumulative, the app's third column).
    """

    features: tuple[FeatureId, ...]
    task: str = "activate"
    condition: str = "cumulative"
    layer: int | None = None
    strength: float = STRENGTH
    schedule: str = "exp"
    alpha: float = ALPHA
    s_end: float = S_END
    r: float = R
    t_res: float = T_RES
    t_module: float = T_MODULE
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    seed: int = 0
    samples: int = 1
    max_new_tokens: int = TASK_DEFAULTS["activate"]["max_new_tokens"]
    prompt: str = ACTIVATION_PROMPT
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    chat: bool = False
    theme: str = ""
    controls: tuple[str, ...] = ()
    scope: str = "all"
    compare: bool = False

    @classmethod
    def create(cls, feature, names: dict[str, str] | None = None, n_layers: int | None = None,
               **values) -> "SteerSettings":
        """Validated settings from raw values (CLI arguments, form fields, API arguments).

        ``feature``: an id, a comma-separated seed set or a list of ids. ``None`` values take the
        default (``max_new_tokens`` and ``prompt``: the task's); ``layer`` -1 or "" means the
        seed's layer; ``n_layers`` bounds it when known. ``names`` maps a field to the name errors
        show (e.g. ``--strength``).
        Raises ValueError naming the field and what is allowed."""
        names = names or {}
        known = {f.name for f in fields(cls)} - {"features"}
        extra = set(values) - known
        if extra:
            raise ValueError(f"unknown settings {sorted(extra)}; valid: {', '.join(sorted(known))}")
        v = {k: x for k, x in values.items() if x is not None}
        items = feature.split(",") if isinstance(feature, str) else list(feature or [])
        features = tuple(parse_feature(x.strip() if isinstance(x, str) else x) for x in items
                         if not isinstance(x, str) or x.strip())
        if not features:
            raise ValueError("feature: give a feature id layer/site/index, or several separated by commas")
        task = check_choice(names.get("task", "task"), v.get("task", "activate"), TASKS)
        defaults = TASK_DEFAULTS[task]
        out = dict(features=features, task=task)
        out["condition"] = check_condition(v.get("condition", "cumulative"), names.get("condition", "condition"))
        out["schedule"] = check_choice(names.get("schedule", "schedule"), v.get("schedule", "exp"), SCHEDULES)
        out["scope"] = check_choice(names.get("scope", "scope"), v.get("scope", "all") or "all", SCOPES)
        layer = v.get("layer")
        if layer in ("", -1):
            layer = None
        if layer is not None:
            if len(features) > 1:
                raise ValueError(f"{names.get('layer', 'layer')} applies to one seed feature; with a seed set each "
                                 "graph uses its seed's layer")
            layer = limits.check_int(names.get("layer", "layer l"), layer, 0, (n_layers or 10**6) - 1)
        out["layer"] = layer
        checked = limits.check_steer_args(
            names=names, alpha=v.get("alpha", ALPHA), s_end=v.get("s_end", S_END), samples=v.get("samples", 1),
            seed=v.get("seed", 0), max_new_tokens=v.get("max_new_tokens", defaults["max_new_tokens"]),
            temperature=v.get("temperature", TEMPERATURE), top_p=v.get("top_p", TOP_P),
            prompt=v.get("prompt", defaults["prompt"]))
        out.update(checked)
        out["strength"] = check_strength(v.get("strength", STRENGTH), "add", names.get("strength"))
        out["r"] = check_strength(v.get("r", R), "rescale", names.get("r"))
        limits.check_int(f"{names.get('seed', 'seed')} + {names.get('samples', 'samples')} - 1",
                         out["seed"] + out["samples"] - 1, 0, limits.MAX_SEED)
        for key, default in (("t_res", T_RES), ("t_module", T_MODULE)):
            t = v.get(key, default)
            limits.check_number(names.get(key, key), t, 1.0)
            out[key] = float(t)
        out["exclude"], out["include"] = node_ids(v.get("exclude")), node_ids(v.get("include"))
        out["theme"] = limits.clean_text(names.get("theme", "theme"), v.get("theme", ""), 300, allow_empty=True).strip()
        out["controls"] = parse_controls(v.get("controls", ()))
        out["chat"], out["compare"] = bool(v.get("chat", False)), bool(v.get("compare", False))
        return cls(**out)

    @property
    def edit_mode(self) -> str:
        """``add`` for activation, ``rescale`` for removal."""
        return "rescale" if self.task == "remove" else "add"

    @property
    def edit_strength(self) -> float:
        """What each edit applies: s (add) or r (rescale)."""
        return self.r if self.task == "remove" else self.strength

    @property
    def seeds(self) -> list[int]:
        """Sampler seeds: seed, seed + 1, ..., seed + samples - 1."""
        return [self.seed + i for i in range(self.samples)]

    @property
    def feature(self) -> str:
        """The seed feature(s) as typed back: ids separated by commas."""
        return ",".join(str(f) for f in self.features)

    def to_json(self) -> dict:
        """The run record's ``settings`` (never an API key: none is part of the settings)."""
        d = asdict(self)
        d["features"] = [str(f) for f in self.features]
        for k in ("exclude", "include", "controls"):
            d[k] = list(d[k])
        return d
