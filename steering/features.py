"""Feature ids: ``layer/site/index`` everywhere (paper §3.3 sites), e.g. ``12/res/4111``."""

from __future__ import annotations

import re
from typing import NamedTuple

from .presets import SITES

_ID = re.compile(r"^\s*(\d+)\s*/\s*([a-zA-Z]+)\s*/\s*(\d+)\s*$")


class FeatureId(NamedTuple):
    """One SAE feature: its layer, site (res, mlp, attn) and index in that SAE."""

    layer: int
    site: str
    index: int

    def __str__(self) -> str:
        return f"{self.layer}/{self.site}/{self.index}"


def parse_feature(text: "str | FeatureId", bundle=None) -> FeatureId:
    """Parse ``layer/site/index`` and, given a bundle, check it exists there.

    Errors say what is wrong and what is allowed (valid layers, sites and index range).
    """
    if isinstance(text, FeatureId):
        fid = text
    else:
        if not isinstance(text, str):
            raise ValueError(f"feature id must be a string like '12/res/4111', got {type(text).__name__}")
        m = _ID.match(text)
        if not m:
            shown = repr(text[:60])
            shown = shown if len(shown) <= 80 and len(text) <= 60 else shown[:77] + "…"
            raise ValueError(f"malformed feature id {shown}; expected layer/site/index, "
                             f"e.g. '12/res/4111': non-negative layer and index, site one of {', '.join(SITES)}")
        fid = FeatureId(int(m.group(1)), m.group(2).lower(), int(m.group(3)))  # "8/RES/697" is 8/res/697
    if fid.site not in SITES:
        raise ValueError(f"unknown site {fid.site!r} in feature id {str(fid)!r}; valid sites: {', '.join(SITES)}")
    if bundle is not None:
        layers = bundle.layers
        if fid.layer not in layers:
            raise ValueError(f"layer {fid.layer} out of range in feature id {str(fid)!r}; "
                             f"valid layers: {layers[0]}..{layers[-1]}")
        if (fid.layer, fid.site) not in bundle.saes:
            raise ValueError(f"no {fid.site} SAE at layer {fid.layer}; sites: {', '.join(bundle.sites)}")
        width = bundle.width(fid.layer, fid.site)
        if not 0 <= fid.index < width:
            raise ValueError(f"index {fid.index} out of range in feature id {str(fid)!r}; "
                             f"valid indices for {fid.layer}/{fid.site}: 0..{width - 1}")
    return fid
