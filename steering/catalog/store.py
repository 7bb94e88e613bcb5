"""The catalog of a preset in memory and on disk: `Catalog` (columns per SAE, lazy details and
contexts, cards, search), `FeatureCard`, `Hit`, load / save.

Files (``save``): ``meta.json``; ``features_{site}.json.gz`` (labels and stats, read by ``load``);
``details_{site}.json.gz`` (top / promoted tokens, context words, tags: read on the first search or
card of that site); ``contexts/{site}_{layer}.json.gz`` (context windows, read by ``card``);
``related.json.gz`` (related words of search). Newlines inside tokens are written as the two
characters ``\\n``.
"""

from __future__ import annotations

import datetime
import functools
import gzip
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..features import FeatureId, parse_feature
from .labels import FUNCTION_SHARE, LENS_MIN_DEPTH, function_share, lens_words, readable_label, relabel_offline
from .search import Hit, search, site_index
from .words import N_RELATED, RELATED_MIN_SIM, catalog_words, common_promoted, minilm_embedder, related_words

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 50 * 2**20
FORMAT = 2


@dataclass
class FeatureCard:
    """Everything the catalog knows about one feature.

    Fields:
        feature: ``layer/site/index``.
        label: short description; label_source says who wrote it (``offline`` or ``llm``).
        contexts: top-activating contexts, strongest first: ``{"tokens": [...], "index": position
            of the max token in tokens, "act": its activation, "domain": corpus domain}``.
        stats: ``max_act``, ``frequency`` (share of counted tokens where it fires), ``mean_act``
            (mean non-zero activation), ``n_tokens`` (tokens counted, position 0 excluded).
        top_tokens: tokens with the largest summed activation among its top activations;
            top_token_shares: their share of that sum.
        promoted_tokens: logit lens, top tokens of W_U (g * d_f) (``promoted_tokens``).
        context_words: words shared by its top contexts (most specific first).
        tags: token-class / domain tags (``_tags``).
    """

    feature: str
    label: str
    label_source: str
    contexts: list[dict]
    stats: dict
    top_tokens: list[str]
    top_token_shares: list[float]
    promoted_tokens: list[str]
    context_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    @property
    def max_act(self) -> float:
        return self.stats["max_act"]

    @property
    def frequency(self) -> float:
        return self.stats["frequency"]

    @property
    def mean_act(self) -> float:
        return self.stats["mean_act"]

    def to_json(self) -> dict:
        return dict(self.__dict__)



BASIC = ("label", "src", "max", "freq", "mean")  # features_{site}.json.gz, read at load
DETAIL = ("top", "out", "cw", "tags", "nctx")  # details_{site}.json.gz, read on first use


class Catalog:
    """The catalog of one preset (made by `steering.catalog.build.build_catalog`, or `load`ed).

    ``summary[(layer, site)]`` holds columns indexed by feature: ``BASIC`` ones always, ``DETAIL``
    ones once that site's details are read; contexts are read lazily from ``root``. Lazy reads
    are serialized by a lock (the app calls from many threads)."""

    def __init__(self, summary: dict[tuple[int, str], dict], meta: dict, root: Path | None = None,
                 contexts: dict[tuple[int, str], list] | None = None):
        self.summary, self.meta, self.root = summary, meta, root
        self._contexts: dict[tuple[int, str], list] = dict(contexts or {})
        self._index: dict[str, dict] = {}
        self._related: dict[str, list] | None = None
        self._common: dict[str, set[str]] = {}
        self._lock = threading.RLock()

    # ---- loading / saving --------------------------------------------------------------
    @classmethod
    def load(cls, source) -> "Catalog":
        """From a folder, or from a bundle (its preset's ``assets/catalog``; widths are checked
        against the bundle's SAEs and a catalog built for other SAE weights is refused)."""
        bundle = source if hasattr(source, "preset") else None
        root = bundle.preset.assets_root / "catalog" if bundle is not None else Path(source)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no feature catalog at {root} (build one with "
                                    f"python -m steering catalog build --out {root})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"catalog at {root} has format {meta.get('format')}, this code reads {FORMAT}; rebuild it")
        summary = {}
        for site in meta["sites"]:
            for layer, cols in _read_gz(root / f"features_{site}.json.gz").items():
                summary[(int(layer), site)] = cols
        cat = cls(summary, meta, root)
        if bundle is not None:
            cat.check_bundle(bundle)
        return cat

    def check_bundle(self, bundle) -> None:
        """Raise ValueError when the catalog does not describe the bundle's SAEs."""
        fps = self.meta.get("fingerprints", {})
        for (layer, site), cols in self.summary.items():
            if (layer, site) not in bundle.saes:
                continue
            if len(cols["label"]) != bundle.width(layer, site):
                raise ValueError(f"catalog has {len(cols['label'])} features for {layer}/{site}, the SAE has "
                                 f"{bundle.width(layer, site)}: rebuild the catalog")
            key = f"{layer}/{site}"
            if key in fps and not fingerprint_matches(fps[key], sae_fingerprint(bundle, layer, site)):
                raise ValueError(f"catalog was built for other SAE weights at {key} (fingerprint differs): "
                                 "rebuild it with python -m steering catalog build")

    def save(self, root: Path | str) -> dict[str, int]:
        """Write meta.json, features_{site}.json.gz, details_{site}.json.gz and
        contexts/{site}_{layer}.json.gz; returns {relative path: bytes} (also recorded in meta.json).
        Raises if a file exceeds 50 MB."""
        root = Path(root)
        (root / "contexts").mkdir(parents=True, exist_ok=True)
        sizes = {}
        for site in sorted({s for _, s in self.summary}):
            self._detailed(site)
            for name, fields in (("features", BASIC), ("details", DETAIL)):
                data = {str(l): {f: cols[f] for f in fields} for (l, s), cols in sorted(self.summary.items())
                        if s == site}
                sizes[f"{name}_{site}.json.gz"] = _write_gz(root / f"{name}_{site}.json.gz", data)
        for (layer, site) in sorted(self.summary):
            rel = f"contexts/{site}_{layer:02d}.json.gz"
            sizes[rel] = _write_gz(root / rel, self.contexts(layer, site))
        rel = self.related()
        if rel:
            vocab = sorted({r for lst in rel.values() for r, _ in lst})
            pos = {w: j for j, w in enumerate(vocab)}
            sizes["related.json.gz"] = _write_gz(root / "related.json.gz", {
                "words": vocab, "related": {q: [[pos[r], sim] for r, sim in lst] for q, lst in sorted(rel.items())}})
        too_big = {k: v for k, v in sizes.items() if v > MAX_FILE_BYTES}
        if too_big:
            raise ValueError(f"catalog files over {MAX_FILE_BYTES >> 20} MB: {too_big}; use fewer contexts")
        self.meta.update(files=sizes, total_bytes=sum(sizes.values()), sites=sorted({s for _, s in self.summary}))
        (root / "meta.json").write_text(json.dumps(self.meta, indent=1))
        self.root = root
        return sizes

    def contexts(self, layer: int, site: str) -> list:
        """Context rows of one SAE: per feature ``[[tokens, index, act, domain], ...]``."""
        key = (layer, site)
        with self._lock:
            if key not in self._contexts:
                if self.root is None:
                    raise FileNotFoundError(f"no contexts for {layer}/{site}")
                self._contexts[key] = _read_gz(self.root / f"contexts/{site}_{layer:02d}.json.gz")
            return self._contexts[key]

    def _detailed(self, site: str) -> None:
        """Read the DETAIL columns of a site if they are not in memory yet."""
        with self._lock:
            keys = [k for k in self.summary if k[1] == site and "top" not in self.summary[k]]
            if not keys:
                return
            if self.root is None:
                raise FileNotFoundError(f"no details for site {site}")
            for layer, cols in _read_gz(self.root / f"details_{site}.json.gz").items():
                self.summary[(int(layer), site)].update(cols)

    def related(self) -> dict[str, list[tuple[str, float]]]:
        """Query word -> [(related catalog word, similarity)], from ``related.json.gz`` ({} if none)."""
        with self._lock:
            if self._related is None:
                path = self.root / "related.json.gz" if self.root is not None else None
                if path is None or not path.is_file():
                    self._related = {}
                else:
                    data = _read_gz(path)
                    vocab = data["words"]
                    self._related = {q: [(vocab[j], sim) for j, sim in rel] for q, rel in data["related"].items()}
            return self._related

    # ---- lookups ----------------------------------------------------------------------------
    def columns(self, fid: FeatureId, detail: bool = False) -> dict:
        """The columns of the SAE that holds ``fid`` (its DETAIL columns read when ``detail``)."""
        cols = self.summary.get((fid.layer, fid.site))
        if cols is None or not 0 <= fid.index < len(cols["label"]):
            raise ValueError(f"feature {fid} is not in the catalog (it covers "
                             f"{', '.join(f'{l}/{s}' for l, s in sorted(self.summary)[:3])}...)")
        if detail:
            self._detailed(fid.site)
        return cols

    def label(self, fid) -> str:
        """The feature's label, or "" when the catalog does not have it."""
        try:
            f = parse_feature(fid)
            return self.columns(f)["label"][f.index]
        except ValueError:
            return ""

    def plain_label(self, fid) -> str:
        """The feature's label for a lay reader (`labels.readable_label`: whole words, no word
        pieces or logit-lens tokens; an LLM label as written), or "" when the catalog does not have it."""
        try:
            f = parse_feature(fid)
            cols = self.columns(f, detail=True)
        except ValueError:
            return ""
        i = f.index
        if cols["src"][i] == "l":
            return cols["label"][i]
        return readable_label([tuple(x) for x in cols["top"][i]], [w for w, _ in cols["cw"][i]], cols["tags"][i],
                              self.lens_words(f))

    def lens_words(self, fid) -> list[str]:
        """Whole words the feature's direction makes the model say (`labels.lens_words` of its
        logit-lens tokens), for features in the second half of the layers (LENS_MIN_DEPTH) only;
        [] elsewhere or when the MiniLM vocabulary is not installed."""
        f = parse_feature(fid) if isinstance(fid, str) else fid
        layers = [l for l, s in self.summary if s == f.site]
        if not layers or f.layer < LENS_MIN_DEPTH * max(layers):
            return []
        cols = self.columns(f, detail=True)
        return lens_words(cols["out"][f.index], _vocab(), self._common_promoted(f.site))

    def _common_promoted(self, site: str) -> set[str]:
        with self._lock:
            if site not in self._common:
                self._detailed(site)
                self._common[site] = common_promoted(self.summary, site)
            return self._common[site]

    def function_features(self, layer: int, site: str) -> list[bool]:
        """Per feature of one SAE: True where it fires on form rather than a topic: punctuation,
        spaces, function words (`labels.function_share` >= FUNCTION_SHARE), or on more than
        DENSE_FREQ of all tokens (dense features, e.g. 6/res/348, active on 73% of tokens and
        far above its mean on some " the": it topped "Which features fire?" on a concert sentence)."""
        cols = self.summary.get((layer, site))
        if cols is None:
            return []
        self._detailed(site)
        return [function_share([tuple(x) for x in top]) >= FUNCTION_SHARE or freq > DENSE_FREQ
                for top, freq in zip(cols["top"], cols["freq"])]

    def labels(self) -> dict[str, str]:
        """``{"layer/site/index": label}`` for every feature (flow graphs)."""
        return {f"{l}/{s}/{i}": lab for (l, s), cols in self.summary.items() for i, lab in enumerate(cols["label"])}

    def card(self, fid) -> FeatureCard:
        f = parse_feature(fid)
        cols, i = self.columns(f, detail=True), f.index
        domains = self.meta.get("domains", [])
        ctx = [{"tokens": c[0], "index": c[1], "act": c[2], "domain": domains[c[3]] if c[3] < len(domains) else ""}
               for c in self.contexts(f.layer, f.site)[i]]
        stats = {"max_act": cols["max"][i], "frequency": cols["freq"][i], "mean_act": cols["mean"][i],
                 "n_tokens": self.meta.get("tokens", 0)}
        return FeatureCard(str(f), cols["label"][i], "llm" if cols["src"][i] == "l" else "offline", ctx, stats,
                           [t for t, _ in cols["top"][i]], [s for _, s in cols["top"][i]], cols["out"][i],
                           [w for w, _ in cols["cw"][i]], cols["tags"][i])

    # ---- search --------------------------------------------------------------------------------
    def site_index(self, site: str) -> dict:
        """Inverted index of one site (`steering.catalog.search.site_index`), built once."""
        with self._lock:
            if site not in self._index:
                self._detailed(site)
                self._index[site] = site_index(self.summary, site)
            return self._index[site]

    def search(self, query: str, k: int = 20, sites: Iterable[str] = ("res",),
               layers: Iterable[int] | None = None) -> list[Hit]:
        """Keyword search (`steering.catalog.search.search`)."""
        return search(self, query, k, sites, layers)

    # ---- derived fields ------------------------------------------------------------------------
    def derive(self, embed="auto", query_vocab: list[str] | None = None) -> None:
        """Fields derived from the collected data, recomputable without the model (``refresh``):
        offline labels (LLM labels are kept) and the related words of search. ``embed``:
        ``"auto"`` (MiniLM when installed), None (no related words) or a function list[str] ->
        unit-norm [n, d] tensor; ``query_vocab``: extra query-side words for it."""
        with self._lock:
            for site in sorted({s for _, s in self.summary}):
                self._detailed(site)
                relabel_offline(self.summary, site)
            self._index.clear()
        note = None
        if embed == "auto":
            try:
                embed, vocab = minilm_embedder()
                query_vocab = list(query_vocab or []) + vocab
            except (ImportError, FileNotFoundError) as e:
                log.warning("no related words for search (MiniLM unavailable: %s)", e)
                embed = None
        related = {}
        if embed is not None:
            t = time.time()
            related = related_words(catalog_words(self.summary), list(query_vocab or []), embed)
            note = (f"query expansion: MiniLM cosine >= {RELATED_MIN_SIM}, up to {N_RELATED} words, "
                    f"{len(related)} query words ({time.time() - t:.0f} s)")
        with self._lock:
            self._related = related
        self.meta["related_words"] = note
        self.meta["label_rule"] = ("offline label: steering.catalog.labels.offline_label (top tokens · ctx: shared "
                                   "context words → promoted tokens [tags]), promoted words common to many features "
                                   "left out")
        self.meta["derived"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def _vocab() -> frozenset[str]:
    """The MiniLM vocabulary's whole words (`embeddings.minilm_vocab`); empty, with a warning, when
    the judge's package is not installed (labels then carry no lens words)."""
    from ..embeddings import minilm_vocab
    try:
        return minilm_vocab()
    except FileNotFoundError as e:
        log.warning("labels without lens words: %s", e)
        return frozenset()


def _read_gz(path: Path):
    with gzip.open(path, "rb") as fh:
        return json.loads(fh.read())


def _write_gz(path: Path, data) -> int:
    # mtime=0 keeps the bytes reproducible for the same content
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as fh:
        fh.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return path.stat().st_size


DENSE_FREQ = 0.3  # a feature active on more tokens than this is dense (94 of the default's 30,720 res features)
FINGERPRINT_BLOCKS = 32  # decoder rows are fingerprinted in this many blocks
FINGERPRINT_RTOL = 5e-3  # per block: bf16 vs fp16 storage moves a block by < 1e-3, one new row by ~3e-2


def sae_fingerprint(bundle, layer: int, site: str) -> list[float]:
    """Numbers that change when any decoder row of an SAE changes, and not when its dtype does:
    for each of `FINGERPRINT_BLOCKS` blocks of rows, sum_i |d_i . r_i| over the block's rows i,
    r_i fixed random vectors. A revived or retrained latent moves its block's number by a few %;
    fp16 -> bf16 storage by < 0.1%. (Until session 13 one number over the first 8 rows, which
    missed the MLP SAEs' revived latents.)"""
    W = bundle.sae(layer, site).W_dec.detach().float().cpu()  # [w, d]
    proj = (W * _fingerprint_directions(*W.shape)).sum(1).abs()  # [w]
    return [round(float(b.sum()), 4) for b in proj.tensor_split(FINGERPRINT_BLOCKS)]


@functools.lru_cache(maxsize=4)
def _fingerprint_directions(w: int, d: int):
    """The fixed random vectors r_i of `sae_fingerprint`, [w, d], drawn once per SAE shape (the
    catalog check fingerprints every SAE at start-up)."""
    import torch

    return torch.randn(w, d, generator=torch.Generator().manual_seed(0))


def fingerprint_matches(stored, current: list[float]) -> bool:
    """Whether a catalog's stored fingerprint (a list, or a float from a catalog built before
    session 13, which is not checked) matches an SAE's current one."""
    if not isinstance(stored, list):
        return True
    return len(stored) == len(current) and all(
        abs(a - b) <= FINGERPRINT_RTOL * max(1.0, abs(a)) for a, b in zip(stored, current))

