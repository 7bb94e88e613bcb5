"""Feature catalog: top-activating contexts, activation statistics, labels and search.

    python -m steering catalog build --preset default --tokens 150000
    python -m steering catalog search "wedding"

Modules:
- `store`: `Catalog` (columns per SAE, lazy details and contexts, cards, derived fields), `FeatureCard`,
  load / save and the file layout;
- `build`: corpus sampling, running statistics and `build_catalog` (one pass of the model);
- `labels`: the offline label rule and LLM labels;
- `words`: searchable words, theme words, token display strings, related words (query expansion);
- `search`: the inverted index and the ranking of `Catalog.search`.
"""

from .build import CTX, build_catalog, context_windows, corpus_sequences
from .labels import offline_label
from .search import Hit
from .store import Catalog, FeatureCard
from .words import theme_words, token_strings

__all__ = ["CTX", "Catalog", "FeatureCard", "Hit", "build_catalog", "context_windows", "corpus_sequences",
           "offline_label", "theme_words", "token_strings"]
