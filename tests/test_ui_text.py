"""What the app writes around generated texts (pure, no model): texts shown verbatim, the prompt
line above the columns, the note of "Open it in the Playground"."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from markdown_it import MarkdownIt

from steering.settings import SteerSettings
from steering.ui import Playground

TRICKY = ["- a list item?", "+ plus", "* star", "010. What", "1) first", "# heading", "> quote", "**bold** and _it_",
          "<b>html</b> & co", "`code` | pipe", "[link](http://x)", "line one\n- line two", "\\backslash", "~~gone~~",
          "   indented code"]


def _rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)


@pytest.mark.parametrize("text", TRICKY)
def test_generated_text_is_shown_verbatim_never_as_markdown(text):
    """Issue 17: a text starting with '- ' stays text; no character of a text formats the column."""
    gen = SimpleNamespace(variant="steered", seed=0, text=text, metrics={}, token_ids=[])
    score = SimpleNamespace(available=False, error="n/a")
    md = Playground.column_markdown({"generations": [gen], "scores": [score], "variants": ["steered"]}, "steered")
    html = _rendered(md)
    quote = re.search(r"<blockquote>\s*<p>(.*?)</p>\s*</blockquote>", html, re.S)
    assert quote, html
    inner = quote.group(1)
    assert not re.search(r"<(ul|ol|li|h\d|strong|em|code|a|b|del|pre|table)\b", inner), inner
    shown = (inner.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))
    assert re.sub(r"\s+", " ", shown.replace("⏎", " ")).strip() == re.sub(r"\s+", " ", text).strip()


def test_prompt_line_and_carried_settings_say_what_they_are():
    assert Playground.prompt_line("I think ", chat=True) == ("**Prompt**, the same for every column (through the "
                                                            "chat template): «I think »")
    s = SteerSettings.create("4/res/421", task="activate", condition="single", layer=4, strength=4.0, alpha=-0.05,
                             samples=2, max_new_tokens=36, theme="religion", controls=("prompt", "random"))
    note = Playground.carried_markdown("Religion", s)
    for part in ("“Religion”", "feature `4/res/421`", "condition single", "layer 4", "strength s = 4", "alpha = -0.05",
                 "prompt «", "judge theme “religion”", "2 samples from seed 0", "36 new tokens",
                 "controls: prompt, random", "token scope all"):
        assert part in note, part
    removal = Playground.carried_markdown("Physics", SteerSettings.create("5/res/824", task="remove", r=0.0))
    assert "rescale r = 0" in removal and "strength" not in removal


def test_feature_activation_line_says_what_a_zero_means():
    """Walkthrough: "mean activation of 27/res/402 0.00" on one steered sample (11.75 on the next)
    read like a failed measurement. It is a real reading (the unsteered model reading the text:
    the feature fires on none of its tokens), and the line now says so."""
    score = SimpleNamespace(available=False, error="n/a")
    gens = [SimpleNamespace(variant="steered", seed=s, text="t", token_ids=[1] * 36,
                            metrics={"n_tokens": 36, "feature_activation": {"27/res/402": a},
                                     "feature_active_tokens": {"27/res/402": n}})
            for s, a, n in ((0, 0.0, 0), (1, 11.75, 13))]
    md = Playground.column_markdown({"generations": gens, "scores": [score, score], "variants": ["steered"]},
                                    "steered", "27/res/402")
    assert ("27/res/402 when the unsteered model reads this text: mean activation 0.00, fires on 0 of 36 tokens "
            "(none: this text does not evoke it)") in md
    assert "mean activation 11.75, fires on 13 of 36 tokens</small>" in md
