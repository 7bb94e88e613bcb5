"""Export a steering plan as a llama.cpp control vector (GGUF), the format repeng writes.

    python -m steering export 12/res/40 --condition cumulative --strength 2 --out food.gguf
    llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector food.gguf -p "I think "

What is written: for every layer, the sum of the plan's additive edits at that layer, the same
vectors `steering.steer` adds (strength x typical activation c_f x decoder direction d_f, in the
model's residual units, float32, [d_model]), as tensor ``direction.N``; metadata
``controlvector.model_hint`` and ``controlvector.layer_count``.

Layer numbering, as llama.cpp reads it (common.cpp loads ``direction.N`` into slot N - 1 and
refuses N = 0; llama-adapter.cpp gives slot il - 1 to layer il for il = 1 .. n_layer - 1; the
graph adds layer il's vector to the output of block il, after its MLP residual add):
``direction.N`` is added to the residual stream after block N (0-based), which is this
project's ``N/res`` site (``blocks.N.hook_resid_post``). So:

- ``N/res`` edits go to ``direction.N`` exactly.
- ``N/mlp`` edits also go to ``direction.N`` exactly: the MLP output is added to the residual
  stream at the end of block N, and an addition commutes with that sum.
- ``N/attn`` edits go to ``direction.N`` **approximately**: in the playground the attention
  output is edited before block N's MLP reads the residual stream; llama.cpp can only add after
  it. Reported in ``approximate``.
- Layer 0 cannot be steered by llama.cpp (it has no slot for block 0's output): such edits are
  left out and reported in ``skipped``.
- llama.cpp adds the vector at every position (prompt, attention sinks and BOS included), where
  the playground leaves sinks alone (§5.3 steering, our sink handling in `steering.sinks`).
- Theme removal (rescaling, paper §5.2) depends on the current activation and is no constant
  vector: it cannot be exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .steer import SteerSpec, direction

log = logging.getLogger(__name__)
ARCH = "controlvector"


def layer_vectors(bundle, specs: list[SteerSpec]) -> tuple[dict[int, torch.Tensor], list[str], list[str]]:
    """Per-layer control vectors of a plan: ({layer: [d_model] float32}, approximate, skipped),
    the last two lists of feature ids (see the module docstring).

    Raises:
        ValueError: a rescale (removal) spec, or nothing left to export.
    """
    out: dict[int, torch.Tensor] = {}
    approx, skipped = [], []
    for s in specs:
        if s.mode != "add":
            raise ValueError("export: theme removal (--task remove) rescales the current activation and is "
                             "not a constant vector; only --task activate plans can be exported")
        f = s.feature
        if f.layer == 0:
            skipped.append(str(f))
            continue
        c = float(bundle.ref_scale(f.layer, f.site)[f.index]) if s.units == "folded" else 1.0
        vec = s.strength * c * direction(bundle, f, s.direction_seed).float().cpu()  # [d_model]
        out[f.layer] = out.get(f.layer, torch.zeros(bundle.d_model)) + vec
        if f.site == "attn":
            approx.append(str(f))
    if not out:
        raise ValueError(f"export: nothing to export; llama.cpp cannot steer layer 0 (skipped: {', '.join(skipped)})")
    if skipped:
        log.warning("export: layer-0 edits left out (llama.cpp has no slot for them): %s", ", ".join(skipped))
    return out, approx, skipped


def write_control_vector(path: Path, vectors: dict[int, torch.Tensor], model_hint: str) -> Path:
    """Write ``vectors`` ({layer N >= 1: [d_model]}) as a llama.cpp control-vector GGUF."""
    import gguf

    if any(n < 1 for n in vectors):
        raise ValueError("llama.cpp control vectors have no layer 0 (direction.0 is refused)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_string(f"{ARCH}.model_hint", model_hint)
    w.add_uint32(f"{ARCH}.layer_count", len(vectors))
    for n in sorted(vectors):
        w.add_tensor(f"direction.{n}", vectors[n].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_control_vector(path: Path) -> tuple[dict[int, torch.Tensor], dict]:
    """Read a control-vector GGUF back: ({layer: [d_model]}, {"model_hint", "layer_count"})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    vecs = {int(t.name.split(".", 1)[1]): torch.tensor(t.data.copy()).flatten() for t in r.tensors
            if t.name.startswith("direction.")}
    meta = {}
    for key in ("model_hint", "layer_count"):
        field = r.fields.get(f"{ARCH}.{key}")
        if field is not None:
            value = field.parts[field.data[0]]
            meta[key] = bytes(value).decode() if key == "model_hint" else int(value[0])
    return vecs, meta
