"""Does a more open neutral prompt let the demo's steering settings work better than "I think "?

    python scripts/prompt_scan.py --out results/default/demo/prompt_scan.json   # ~8 min on 2 cores

For each case (theme, feature, settings) every prompt of PROMPTS runs unsteered and steered on the
demo sweep's 8 seeds, and the hits are counted by the sweep's rules (`demo_sweep.judged`: a theme
word in a readable sample). Session 10 ran it on the demo examples of commit 59c5b6f; docs/results.md
has the table. A best-of-prompts pick on 8 seeds is as lucky as any best-of-N pick: compare
prompts by their total over themes, not by one cell.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

PROMPTS = ["I think", "I think ", "Let me tell you about ", "Today I want to talk about ", "Once upon a time, ",
           "My favourite thing is ", "Here is what I learned: "]
CASES = [("Religion", "15/res/824", ["single:6", "single:8"]), ("Sport", "27/res/884", ["single:6", "single:8"]),
         ("Food", "8/res/514", ["single:4", "single:6"]), ("Music", "6/res/507", ["single:6", "cumulative:2"])]

log = logging.getLogger("prompt_scan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    from steering.bundle import Bundle
    from steering.experiments import demo_sweep as ds
    from steering.flow import build_flow_graph, build_tables
    from steering.generate import generate_variants

    bundle = Bundle.load("default")
    build_tables(bundle)
    rows = []
    for title, fid, settings in CASES:
        graph = build_flow_graph(bundle, fid)
        rec = {"words": sorted(set(ds.THEMES[title]["words"].split())), "task": "activate"}
        for prompt in PROMPTS:
            variants = {"unsteered": [], **{s: ds.setting_plan(graph, s, "activate") for s in settings}}
            gens = generate_variants(bundle, prompt, variants, ds.SEEDS, 36)
            judged = ds.judged(gens, list(variants), rec)
            rows.append({"theme": title, "feature": fid, "prompt": prompt,
                         "hits": {k: v["hits"] for k, v in judged.items()},
                         "texts": {k: [x["text"] for x in v["samples"]] for k, v in judged.items()}})
            log.info("%s %r %s", title, prompt, rows[-1]["hits"])
            a.out.write_text(json.dumps({"seeds": ds.SEEDS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
