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


def test_a_control_identical_to_the_unsteered_text_says_why():
    """Session 16's walkthrough: the removal's random-features text of seed 16 was word for word the
    unsteered one and looked like a bug; it is a real no-op (those features never fired), now said."""
    score = SimpleNamespace(available=False, error="n/a")

    def gen(variant, seed, ids):
        return SimpleNamespace(variant=variant, seed=seed, text="t", token_ids=ids, metrics={})

    gens = [gen("unsteered", 16, [1, 2]), gen("unsteered", 17, [3, 4]), gen("random", 16, [1, 2]),
            gen("random", 17, [3, 5])]
    result = {"generations": gens, "scores": [score] * 4, "variants": ["unsteered", "random"], "task": "remove"}
    md = Playground.column_markdown(result, "random")
    assert md.count("Word for word the unsteered text") == 1 and "did not fire" in md
    assert md.index("Word for word") < md.index("**seed 17**")  # under seed 16's text only
    assert "Word for word" not in Playground.column_markdown(result, "unsteered")
    md = Playground.column_markdown({**result, "task": "activate"}, "random")
    assert "did not change a sampled token" in md


def test_demo_evidence_lists_every_fresh_sample_of_each_shipped_example():
    """Session 16's walkthrough: Religion's run showed seeds 16-17, its two misses of 8, under a text
    promising 6 of 8. The Demo tab lists every recorded fresh sample with the rule's mark; the
    marks agree with the counts each example's explanation quotes."""
    import re

    from steering.ui import evidence_markdown, load_demo_evidence, load_demo_examples

    evidence = load_demo_evidence()
    examples = [e for e in load_demo_examples() if e.preset == "default"]
    assert examples
    for ex in examples:
        rec = evidence[ex.title]
        md = evidence_markdown(rec, shown=ex.samples)
        marks = re.findall(r"^- ([✓✗]) \*\*seed (\d+)\*\*", md, flags=re.M)
        assert [int(s) for _, s in marks] == rec["confirm"]["seeds"]
        hits = sum(m == "✓" for m, _ in marks)
        assert hits == rec["confirm"]["steered"]["hits"] == int(re.findall(r"(\d+) of 8", ex.explanation)[0])
        assert f"steered **{hits} of 8**" in md and f"first {ex.samples} seeds" in md
    assert "No recorded" in evidence_markdown(None)


def test_demo_evidence_escapes_texts_and_reads_the_examples_file(tmp_path):
    import json

    from steering.ui import evidence_markdown, load_demo_evidence

    sample = {"seed": 16, "text": "- <b>cake</b> *now*", "hit": True, "readable": True}
    miss = {"seed": 17, "text": "gibberish", "hit": False, "readable": False}
    rec = {"title": "Food", "task": "activate", "confirm": {"seeds": [16, 17], "steered": {"hits": 1, "samples": [sample, miss]},
                                                           "unsteered": {"hits": 0, "samples": [miss, miss]}}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "sweep.json").write_text(json.dumps({"rules": {"max_perplexity": 100}, "themes": [rec]}))
    (tmp_path / "assets").mkdir()
    path = tmp_path / "assets" / "demo_examples.json"
    path.write_text(json.dumps({"examples": [], "evidence": "results/sweep.json"}))
    loaded = load_demo_evidence(path)
    md = evidence_markdown(loaded["Food"], shown=2)
    assert "<b>" not in md and "&lt;b&gt;" in md and "\\*now\\*" in md and "\\- " in md  # verbatim, not markup
    assert "steered **1 of 2**, unsteered 0 of 2" in md and "_(unreadable by the rule)_" in md
    path.write_text(json.dumps({"examples": []}))
    assert load_demo_evidence(path) == {}
