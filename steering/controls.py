"""Controls beside every steered run: is it the feature, or would anything have done? (issue 18)

At temperature 1.27 (paper App. B) any perturbation changes the sample, so a steered text that
differs from the unsteered one proves nothing. Two controls, scored by the same judge:

- ``prompted``: no steering, the model is simply asked. The theme instruction is the user turn
  of the chat template and the run's prompt starts the reply (`generate.encode_prompt`). For
  removal the instruction asks the model to avoid the theme.
- ``random``: the same layers, schedule and norms as the steered run, with random directions
  instead of the features' decoder directions: one seeded random rotation Q of the residual space
  applied to every d_f of the run (norms s'(l) * c_f and all cosines between the run's directions
  kept, so an aligned flow chain stays as aligned as the real one; `steer.direction`). For
  removal (rescale), a random feature of the same site and layer per feature of the chain,
  rescaled by the same r (such a feature may not fire on the text at all: then the control
  changes nothing, which is also what chance looks like).

Pure spec builders plus one generation helper; the CLI (`steer --controls`), the app and the
demo sweep all use `generate_with_controls`.
"""

from __future__ import annotations

import random
from dataclasses import replace

from . import limits
from .features import FeatureId
from .generate import Generation, generate_variants
from .settings import parse_controls
from .steer import SteerSpec

def instruction(theme: str, task: str = "activate") -> str:
    """The plain request of the prompting control."""
    theme = theme.strip()
    if not theme:
        raise ValueError("the prompting control needs a theme (what to ask the model to talk about)")
    return f"Talk about {theme}." if task == "activate" else f"Do not mention {theme}."


def random_control(bundle, specs: list[SteerSpec], seed: int = 0) -> list[SteerSpec]:
    """Norm-matched random counterpart of ``specs`` (module docstring), deterministic in ``seed``."""
    rng = random.Random(seed)
    rotation = rng.randrange(2**31)  # one rotation for the whole run
    out = []
    for s in specs:
        f = s.feature
        if s.mode == "add":
            out.append(replace(s, direction_seed=rotation))
        else:
            width = bundle.width(f.layer, f.site)
            j = rng.randrange(width - 1)
            out.append(replace(s, feature=FeatureId(f.layer, f.site, j + (j >= f.index))))
    return out


def generate_with_controls(bundle, prompt: str, variants: dict[str, list[SteerSpec]], seeds: list[int],
                           controls: tuple[str, ...] = (), theme: str = "", task: str = "activate",
                           steered: str = "steered", control_seed: int = 0, generate=generate_variants,
                           **kwargs) -> list[Generation]:
    """`generate_variants` plus the requested controls for the variant named ``steered``.

    The random control runs in the same batch as the other variants (same prompt, paired seeds);
    the prompted control is a second call with the instruction. Returns every generation;
    control rows have variant ``"random"`` / ``"prompted"``. ``generate``: `generate_variants` or
    a drop-in such as the app's request batcher (`steering.batching`).
    """
    controls = parse_controls(list(controls))
    if controls and steered not in variants:
        raise ValueError(f"controls need a steered variant named {steered!r}; got {', '.join(variants)}")
    if "prompt" in controls:  # refuse a too-long prompting control before any generation
        from .generate import check_request

        check_request(bundle, prompt, kwargs.get("max_new_tokens", 36), len(seeds), False, instruction(theme, task))
    if kwargs.pop("check_cost", False):  # the app's and the CLI's per-request budget (limits.MAX_COST)
        from .generate import encode_prompt

        new = kwargs.get("max_new_tokens", 36)
        n_rows = (len(variants) + ("random" in controls)) * len(seeds)
        tokens = n_rows * (len(encode_prompt(bundle, prompt, kwargs.get("chat", False))) + new)
        if "prompt" in controls:
            n_rows += len(seeds)
            tokens += len(seeds) * (len(encode_prompt(bundle, prompt, False, instruction(theme, task))) + new)
        limits.check_cost(n_rows, round(tokens / n_rows) - new, new)
    todo = dict(variants)
    if "random" in controls:
        todo["random"] = random_control(bundle, variants[steered], control_seed)
    gens = generate(bundle, prompt, todo, seeds, **kwargs)
    if "prompt" in controls:
        kw = {k: v for k, v in kwargs.items() if k != "chat"}
        gens += generate(bundle, prompt, {"prompted": []}, seeds, instruction=instruction(theme, task), **kw)
    return gens
