"""Choose the curated demo examples by measurement (issue 17), with the evidence beside them.

    python -m steering.experiments.demo_sweep --preset default          # ~45 min on 2 CPU cores

For each theme a lay audience knows, candidate residual features come from four sentences about
the theme against the other themes' sentences (features that fire on the theme and not elsewhere,
`contrast_candidates`), from the logit lens (the features whose decoder direction most raises the
theme's words in the output, `lens_candidates`) and from the catalog search (the theme's word).
After those, a **seed set** of the theme's two best on-theme candidates (distinct indices,
`seed_set_candidate`) runs over SET_GRID: both features alone at once, as the app steers "a, b"
typed in the feature box (session 14). Each candidate is swept over condition (baseline =
the seed feature alone, single = its flow-graph nodes at its layer, cumulative = the graph from
l_start to its layer with the exponential schedule, paper §5.3 / App. B.2) and strength, with 8
seeds at the paper's sampling settings (36 tokens, T = 1.27, top-p 0.7) and prompt "I think"
(`DEMO_PROMPT`: the paper's "I think " without the trailing space SmolLM2 continues with digits).

A sample is a **hit** when it is on theme and readable, by rules a reader can check:
- on theme: it contains at least one of the theme's words (whole words, listed in THEMES);
- readable: perplexity under the unsteered model <= MAX_PPL and distinct-2 >= MIN_DISTINCT2.
For removal (the paper's physics prompt, App. B.1) a hit is a readable sample with no theme word.

The chosen setting per theme: features whose catalog label names a theme word first (`on_theme`: a
presenter shows a feature that is visibly about the theme), then graphs spanning >= MIN_SPAN
layers, then the most hits (ties: the weaker push). The best N_RECHECK settings of the first 8
seeds run again on 16 more (RECHECK_SEEDS) and the choice is made on all 24 (`ranked`), which
lessens the luck of a best-of-~35 pick on 8 seeds; even so its count is biased upwards, so the
chosen setting runs once more on 8 fresh seeds (`confirm`, CONFIRM_SEEDS). It counts as shipped
(convincing) only when it reaches MIN_HITS of 8 on the fresh seeds (the unbiased count), beats the
unsteered model and the random control on the first seeds and the unsteered model again on the
fresh ones, and its flow graph spans at least 2 layers. A theme becomes a curated example when its
feature is on theme, steering beat the unsteered model and the random control, and it beat the
unsteered model again on the fresh seeds with at least MIN_DEMO_FRESH hits of 8 (largest fresh-
seed margin first); its explanation says plainly how it compares with asking the model. The others
stay in the evidence only. The Demo tab shows samples from the fresh seeds. The same 8 first seeds
are run for the two controls (`steering.controls`: asking the model, and norm-matched random
directions) and for the unsteered model, all recorded in ``results/<preset>/demo/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import limits
from ..settings import DEPRECATED_CONDITIONS

log = logging.getLogger(__name__)
SEEDS = list(range(8))
# The best few settings again: the choice is made on 24 seeds. Session 17 widened the recheck (it
# was 3 settings on seeds 8-15, fresh seeds 16-23): of the six settings chosen on 16 seeds in
# session 16, four fell to 4-5 of 8 on the fresh seeds (a best-of-~35 pick on 16 seeds still
# favours luck), so more settings are rechecked on more seeds before the fresh check.
RECHECK_SEEDS = list(range(8, 24))
CONFIRM_SEEDS = list(range(24, 32))  # fresh seeds for the chosen setting (SEEDS + RECHECK_SEEDS chose it)
N_RECHECK = 6
DEMO_SAMPLES = 2  # samples a click on a curated example generates (from CONFIRM_SEEDS[0] on)
# The demo's activation prompt: the paper's "I think " (App. B.2) without its trailing space. With
# SmolLM2's tokenizer a prompt ending in a bare space token is continued with a digit in about half
# of the unsteered samples ("I think 1.5 ..."); "I think" is continued with " that", " it", ...
# Measured with scripts/prompt_scan.py (session 10): best-setting hits over Religion, Sport, Food
# and Music 19 vs 13 of 32, unsteered 1 vs 4. The paper's experiments (steering_curves) keep
# the paper's prompt; the examples carry this one ("prompt" in demo_examples.json).
DEMO_PROMPT = "I think"
MAX_PPL = 100.0
MIN_DISTINCT2 = 0.6
MIN_HITS = 6
MIN_DEMO_FRESH = 4  # the Demo tab shows a theme only if it held in at least half of the fresh samples
MIN_SPAN = 2
ALPHA = -0.05  # paper App. B.2
# Strengths in multiples of each feature's typical activation. A cumulative run adds one aligned
# direction per layer of a graph that spans ~20 layers, so it needs a far smaller s than one feature.
# The first sweep (s = 4 / 8 alone, 0.5 / 1 cumulative, late-layer candidates) found s = 8 word salad
# (median perplexity 240-770) and cumulative s <= 1 too weak; this grid sits between.
# Session 10 added single s = 8: on "I think " it put Religion into 6 and Sport into 7 of 8 (s = 6:
# 4 and 5), and a prompt scan found no neutral prompt better than the paper's (docs/saes.md).
# Session 11 added s = 7 (alone and single): Sport at single s = 8 put sport words into all 8 fresh
# samples but 7 of them failed the perplexity cut, s = 6 fewer words. Each theme's record keeps the
# grid it was swept with ("grid"), since the batch a setting ran in is part of what reproduces it.
GRID = [("baseline", 3.0), ("baseline", 5.0), ("baseline", 7.0), ("single", 4.0), ("single", 6.0),
        ("single", 7.0), ("single", 8.0), ("cumulative", 1.0), ("cumulative", 2.0)]
REMOVAL_GRID = [("single", 0.0), ("single", -2.0), ("cumulative", 0.0), ("cumulative", -2.0)]
# Session 14: a seed set of the theme's two best on-theme features, each alone at strength s (the
# app's "a, b" in the feature box: both directions added at once). Each feature is pushed as hard
# as in the single-feature grid's weaker settings; together the push is larger.
SET_GRID = [("baseline", 3.0), ("baseline", 4.0), ("baseline", 5.0)]
N_SET = 2

THEMES = {
    "Weddings": {"query": "wedding", "theme": "weddings and marriage",
                 "probes": ["The bride and groom said their vows at the wedding, and the marriage began.",
                           "My sister got married in June; the bride wore white and the groom cried at the ceremony.",
                           "They sent wedding invitations, chose a cake and planned the honeymoon.",
                           "He proposed to her with a ring, and a year later they became husband and wife."],
                 "words": "wedding weddings bride brides groom marriage married marry marrying ceremony honeymoon "
                          "vows spouse husband wife bridal engaged engagement fiance fiancee wed newlywed newlyweds "
                          "bridesmaid bridesmaids groomsman reception couple couples ring rings proposal proposed "
                          "propose anniversary divorce"},
    "Food": {"query": "food", "theme": "food and cooking",
             "probes": ["We cooked a delicious dinner: soup, bread, cheese and a chocolate cake.",
                           "For lunch I ate a bowl of rice with grilled chicken and fresh vegetables.",
                           "The chef tasted the sauce, added salt and served the pasta hot from the kitchen.",
                           "She baked bread and cookies while a pot of soup was cooking on the stove."],
             "words": "food foods cook cooking cooked recipe recipes meal meals dinner lunch breakfast eat "
                      "eating ate delicious dish dishes bake baking kitchen flavor taste tasty bread cake soup "
                      "chocolate meat beef pork chicken fish rice pasta salad sauce cheese vegetables fruit "
                      "restaurant chef dessert snack fried roasted grilled pizza burger burgers sandwich "
                      "sandwiches potato potatoes tomato tomatoes garlic onion onions spaghetti noodles "
                      "omelette eggs egg butter sugar flour cookies cookie pie seafood shrimp steak stew menu "
                      "ingredient ingredients cuisine hungry banquet feast tea coffee juice apple apples banana "
                      "oven grill vegetable spices spicy sweet salty pancakes "
                      # session 11: common dishes and meal words the first list missed (read in its samples:
                      # "dine ... on a Taco", "fries made with lamb")
                      "dine dining dined taco tacos fries bacon lamb chips cocktail cocktails wine beer burrito "
                      "sushi curry yogurt honey lemon lemons cream candy cupcake cupcakes muffin muffins bakery "
                      "snacks picnic grocery groceries cafe barbecue"},
    "Anger": {"query": "angry", "theme": "anger and frustration",
              "probes": ["I was so angry and furious that I shouted at him in rage.",
                           "He slammed the door, furious that they had lied to him again.",
                           "I hate it when people are rude; it makes me so mad I want to scream.",
                           "She was annoyed and frustrated, and her voice shook with anger."],
              "words": "angry anger furious rage mad frustrated frustration frustrating annoyed hate hated "
                       "yelled shouted irritated outraged angrily fury furiously outrage resentment hatred "
                       "enraged livid annoying irritating scream screamed screaming yell yelling shout shouting "
                       "temper upset"},
    "Sadness": {"query": "sad", "theme": "sadness and grief",
                "probes": ["She felt sad and lonely, and cried with grief after the funeral.",
                           "He was heartbroken and cried alone in his room for days.",
                           "After her dog died she felt empty, sad and full of sorrow.",
                           "Tears ran down his face as he mourned his grandmother."],
                "words": "sad sadness cry cried crying tears grief grieving lonely depressed heartbroken sorrow "
                         "mourning unhappy sorrowful grieve grieved mourn mourned miserable misery despair "
                         "depression loneliness tear weep wept weeping sob sobbed sobbing funeral loss upset "
                         "heartache melancholy"},
    "Sport": {"query": "football", "theme": "sports and games",
              "probes": ["The football team scored a goal and won the match against the champions.",
                           "The players trained hard all season and the coach was proud of the team.",
                           "She won the tennis tournament and the fans cheered in the stadium.",
                           "The basketball game went to overtime before the home team scored."],
              "words": "sport sports football soccer basketball baseball tennis team teams match player players "
                       "goal goals coach league athlete athletes championship tournament olympic olympics game "
                       "games score scored stadium season fans sporting footballer footballers hockey golf rugby "
                       "cricket volleyball swimming athletic athletics race races racing runner runners win won "
                       "victory defeat referee playoff playoffs cup medal"},
    "Music": {"query": "music", "theme": "music and songs",
              "probes": ["The band played a song on guitar and piano at the concert.",
                           "She sings in a choir and practises the violin every evening.",
                           "The singer released a new album of jazz songs with drums and piano.",
                           "We danced to the music while the orchestra played a beautiful melody."],
              "words": "music musical song songs sing singing singer guitar piano band concert melody album "
                       "musician musicians rhythm jazz rock pop lyrics drums violin orchestra tune songwriter "
                       "composer composers composition symphony chord chords guitarist pianist drummer vocals "
                       "vocalist choir opera hip hop rap beat beats record records playlist listen listening "
                       "radio"},
    "Animals": {"query": "dog", "theme": "animals and pets",
                "probes": ["My dog and the cat played with the puppy on the farm with the horses.",
                           "Our cat sleeps on the sofa and the dog barks at the birds outside.",
                           "The kitten chased a mouse while the puppy wagged its tail.",
                           "At the zoo we saw lions, elephants, monkeys and a giraffe."],
                "words": "animal animals dog dogs cat cats pet pets puppy puppies kitten bird birds horse horses "
                         "farm wildlife lion lions tiger tigers elephant elephants monkey monkeys bear bears wolf "
                         "wolves fox rabbit rabbits mouse mice cow cows pig pigs sheep goat goats duck ducks fish "
                         "zoo wild creature creatures species kittens chicken chickens snake snakes insect insects "
                         "kitty pup pups paw paws fur feathers owl owls deer squirrel squirrels hamster parrot "
                         "turtle turtles dolphin dolphins whale whales shark sharks frog frogs bee bees butterfly "
                         "butterflies vet kennel meow"},
    "Religion": {"query": "god", "theme": "religion, church and God",
                 "probes": ["They prayed to God in the church and read the Bible with faith.",
                           "The priest spoke about Jesus and the people prayed together.",
                           "She has a strong faith and goes to church every Sunday to worship the Lord.",
                           "The holy book teaches that God loves everyone, and the believers sang hymns."],
                 "words": "god gods church churches prayer prayers pray prayed faith jesus christ bible religion "
                          "religious spiritual lord holy priest priests pastor bishop pope worship worshipped "
                          "heaven hell sin sins soul souls divine gospel scripture scriptures christian christians "
                          "christianity muslim islam jewish buddhist temple mosque saint saints angel angels bless "
                          "blessed blessing"},
    "Python code": {"query": "python", "theme": "programming and Python code",
                    "probes": ["def main():\n    import os\n    print(os.path.join('a', 'b'))",
                           "The Python function returns a list, and the variable is printed in a for loop.",
                           "import numpy as np\nx = np.zeros(3)\nfor i in range(3):\n    x[i] = i * 2",
                           "The programmer wrote code to parse the file and fixed a bug in the class."],
                    "words": "code coding python function functions programming program programs variable variables "
                             "def import print return software computer algorithm script scripts class classes method "
                             "methods module modules library libraries loop loops list lists string strings integer "
                             "debug bug bugs compile compiler syntax api developer developers programmer programmers "
                             "java javascript html"},
}
REMOVAL = {"title": "Physics (remove it)", "query": "physics", "theme": "scientific concepts and entities",
           "probes": ["Quantum mechanics and general relativity describe particles, energy and gravity.",
                           "Einstein showed that mass and energy are related and that light bends near a star.",
                           "The electron and the photon are particles studied in physics experiments.",
                           "Gravity pulls objects toward the earth with a force that depends on their mass."],
           "words": "physics physical quantum particle particles energy theory theories relativity gravity "
                    "universe mass einstein matter mechanics spacetime electron electrons photon"}


def demo_removal_prompt(paper_prompt: str) -> str:
    """The removal example's prompt: the paper's physics prompt (App. B.1) without its trailing
    space, for the same reason as DEMO_PROMPT (session 11: on "... physics is " most samples of
    every column, unsteered included, began with a digit: "4515 on CPI", "4qubit")."""
    return paper_prompt.rstrip()


def theme_hits(text: str, words: set[str]) -> list[str]:
    """Theme words (whole words, lower case) found in a text."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in words]


def readable(metrics: dict) -> bool:
    ppl = metrics.get("perplexity")
    return ppl is not None and ppl <= MAX_PPL and metrics.get("distinct_2", 1.0) >= MIN_DISTINCT2


def theme_rule(title: str) -> tuple[set[str], str] | None:
    """The theme words and task of a curated example's theme (THEMES, REMOVAL) by its title, for
    showing the rule the examples were chosen by next to a run; None for a title not swept here."""
    if title == REMOVAL["title"]:
        return set(REMOVAL["words"].split()), "remove"
    spec = THEMES.get(title)
    return (set(spec["words"].split()), "activate") if spec else None


def judge_samples(gens, words: set[str], task: str) -> list[dict]:
    out = []
    for g in gens:
        found = theme_hits(g.text, words)
        ok = readable(g.metrics)
        hit = ok and (bool(found) if task == "activate" else not found)
        out.append({"seed": g.seed, "text": g.text, "theme_words": found, "readable": ok, "hit": hit,
                    "perplexity": g.metrics.get("perplexity"), "distinct_2": g.metrics.get("distinct_2")})
    return out


def lens_candidates(bundle, words: set[str], n: int = 2, layers: range | None = None) -> list[str]:
    """Residual features whose decoder direction, read through the unembedding (logit lens: W_U
    (g * d_f), as `catalog.promoted_tokens`), most raises the theme's words: the output side of a
    feature, which is what steering acts through. One best feature per layer of ``layers``
    (default: the middle third on), then the ``n`` best of those."""
    from ..catalog.build import unembedding

    tok = bundle.tokenizer
    ids = sorted({i for w in words for i in tok(" " + w, add_special_tokens=False)["input_ids"][:1]})
    W_all, g = unembedding(bundle)  # [vocab, d_model], [d_model]
    W_U = W_all[ids]  # [n_words, d_model]
    best = []
    n_layers = bundle.n_layers
    if layers is None:
        layers = range(n_layers // 3, n_layers - 2) if n_layers >= 8 else range(n_layers)
    for layer in layers:
        if (layer, "res") not in bundle.saes:
            continue
        dec = bundle.decoder(layer, "res") * g  # [w, d_model]
        theme = (dec @ W_U.T).mean(-1)  # [w]
        spread = (dec @ W_all[:: max(1, len(W_all) // 4096)].T).std(-1).clamp_min(1e-6)  # [w] vs typical tokens
        z = theme / spread
        i = int(z.argmax())
        best.append((float(z[i]), f"{layer}/res/{i}"))
    return [fid for _, fid in sorted(best, reverse=True)[:n]]


@torch.no_grad()
def contrast_candidates(bundle, theme_texts: list[str], other_texts: list[str], layers: range, n: int = 1,
                        min_share: float = 0.75) -> list[str]:
    """Residual features that fire on the theme's sentences and not on other themes' (the input side
    of a feature, what the catalog and the probe show). Per text, a feature's activation is its
    maximum over tokens (sinks and padding left out) in units of its typical activation
    (`Bundle.ref_scale`); a feature scores mean(theme) - mean(others) and counts only if it fires on
    >= ``min_share`` of the theme's sentences. One best feature per layer, then the ``n`` best."""
    from ..sinks import sink_mask

    keys = [(l, "res") for l in layers if (l, "res") in bundle.saes]
    if not keys:
        return []

    def per_text(texts: list[str]) -> dict:  # {key: [n_texts, w]}, each text computed once per bundle
        cache = bundle.cached("demo_sweep.max_acts", dict)  # {(text, key): [w]}, lives with the bundle
        todo = [t for t in dict.fromkeys(texts) if any((t, k) not in cache for k in keys)]
        for i in range(0, len(todo), 8):
            chunk = todo[i:i + 8]
            enc = bundle.tokenize(chunk)
            store, _ = bundle.activations(enc, keys)
            mask = enc["attention_mask"].bool().cpu()  # [b, seq]
            mask[:, 0] = False  # attention sink
            mask &= ~sink_mask(torch.stack([store[k].float().cpu() for k in keys]), enc["attention_mask"].cpu())
            for key in keys:
                z = bundle.encode(*key, store[key]).cpu() / bundle.ref_scale(*key).clamp_min(1e-6)  # [b, seq, w]
                for t, row in zip(chunk, z.masked_fill(~mask[..., None], 0).amax(1)):  # [w] per text
                    cache[(t, key)] = row
        return {key: torch.stack([cache[(t, key)] for t in texts]) for key in keys}

    on, off = per_text(theme_texts), per_text(other_texts)
    best = []
    for key in keys:
        score = on[key].mean(0) - off[key].mean(0)  # [w]
        score[(on[key] > 0).float().mean(0) < min_share] = float("-inf")
        i = int(score.argmax())
        if score[i] > 0:
            best.append((float(score[i]), f"{key[0]}/res/{i}"))
    return [fid for _, fid in sorted(best, reverse=True)[:n]]


def candidates(bundle, catalog, spec: dict, n_search: int = 1, n_contrast: int = 2, n_lens: int = 1,
               n_lens_late: int = 2) -> list[str]:
    """Candidate residual features of a theme: the best contrastive ones (`contrast_candidates`:
    ``n_contrast`` from the middle layers, one from the late ones), the best logit-lens ones
    (`lens_candidates`: ``n_lens`` from the middle layers, ``n_lens_late`` from the late ones) and
    the catalog search's first hit. The late logit-lens ones were added in session 11: the features
    that steered best in session 10 (27/res/402 for music, 27/res/884 for sport) were late
    features whose decoder direction promotes the theme's words (their labels' "→" side)."""
    words = set(spec["words"].split())
    L = bundle.n_layers
    others = [t for o in [*THEMES.values(), REMOVAL] if o is not spec for t in o["probes"]]
    if L >= 8:  # the paper steers a middle layer (12 of 26); the logit lens alone picks late ones
        mid, late = range(L // 4, 2 * L // 3), range(2 * L // 3, L - 2)
        out = contrast_candidates(bundle, spec["probes"], others, mid, n_contrast)
        out += contrast_candidates(bundle, spec["probes"], others, late, 1)
        out += lens_candidates(bundle, words, n_lens, mid)
        out += lens_candidates(bundle, words, n_lens_late, late)
    else:
        out = contrast_candidates(bundle, spec["probes"], others, range(L), n_contrast)
        out += lens_candidates(bundle, words, n_lens)
    # the first and last layers hold few themes (token identity, next-token form)
    lo, hi = (2, bundle.n_layers - 3) if bundle.n_layers >= 8 else (0, bundle.n_layers - 1)
    if catalog is not None:
        out += [h.feature for h in catalog.search(spec["query"], 20)
                if lo <= int(h.feature.split("/")[0]) <= hi][:n_search]
    return list(dict.fromkeys(out))


def is_seed_set(fid: str) -> bool:
    return "," in fid


def graphs_for(bundle, fid: str) -> list:
    """The flow graph of each feature of a candidate (one, or each of a seed set)."""
    from ..flow import build_flow_graph

    return [build_flow_graph(bundle, f.strip()) for f in fid.split(",")]


def graph_for(bundle, fid: str):
    """The flow graph of a candidate: one feature's, or a seed set's graphs merged (`merge_graphs`)."""
    from ..graph import merge_graphs

    return merge_graphs(graphs_for(bundle, fid))


def span_of(graphs: list) -> list[int]:
    """[l_start, l_end] of a candidate for the MIN_SPAN rule: a seed set counts its shortest graph
    (two one-layer graphs at layers 7 and 26 span one layer each, not 7-26)."""
    g = min(graphs, key=lambda g: g.l_end - g.l_start)
    return [g.l_start, g.l_end]


def span_text(graphs: list) -> str:
    """"layers 0-29", or for a seed set "layers 0-29 and 23-29" (each graph's own span)."""
    return "layers " + " and ".join(f"{g.l_start}-{g.l_end}" for g in graphs)


def plan_for(bundle, fid: str, setting: str, task: str) -> list:
    """The steering specs of a sweep setting for a candidate. A seed set is planned as the app plans
    it (`steer.plan_run` on `SteerSettings`), so a curated seed-set example replays exactly."""
    if not is_seed_set(fid):
        return setting_plan(graph_for(bundle, fid), setting, task)
    from ..settings import SteerSettings
    from ..steer import plan_run

    cond, s = setting.split(":")
    kw = {"strength": float(s), "alpha": ALPHA} if task == "activate" else {"r": float(s)}
    settings = SteerSettings.create(fid, task=task, condition=DEPRECATED_CONDITIONS.get(cond, cond), **kw)
    return plan_run(bundle, settings)[1]


def seed_set_candidate(rec: dict, n: int = N_SET) -> str | None:
    """A seed set of the ``n`` on-theme single candidates with the most first-stage hits alone
    (their ``baseline:*`` runs: the seed set steers each feature alone, at least one hit each),
    distinct by index: with the aligned residual SAEs, the same index at two layers is mostly one
    feature carried along (26/res/1013 and 27/res/1013), so the pair would only double it. None
    when there are fewer than ``n`` such candidates. Ids are joined by ", " (as the app writes them)."""
    best = []
    for fid, c in rec["candidates"].items():
        hits = max((r["hits"] for name, r in c["runs"].items() if name.startswith("baseline:")), default=0)
        if not is_seed_set(fid) and hits > 0 and on_theme(c.get("label", ""), rec["words"]):
            best.append((hits, fid))
    out, idx = [], set()
    for _, fid in sorted(best, key=lambda x: (-x[0], x[1])):
        if fid.split("/")[2] not in idx:
            out.append(fid)
            idx.add(fid.split("/")[2])
    return ", ".join(out[:n]) if len(out) >= n else None


def setting_plan(graph, setting: str, task: str) -> list:
    """The steering specs of a sweep setting ``"condition:strength"`` (r for removal) on a feature's
    flow graph, at the seed's layer with the exponential schedule (`steer.plan`)."""
    from ..steer import plan

    cond, s = setting.split(":")
    return plan(graph, cond, graph.seed.layer, float(s), "exp", ALPHA, 1.0,
                mode="add" if task == "activate" else "rescale")


def judged(gens, names, rec: dict) -> dict:
    """``{variant: {"hits", "samples"}}`` of generations by the sweep's rules (`judge_samples`)."""
    out = {}
    for name in names:
        samples = judge_samples([g for g in gens if g.variant == name], set(rec["words"]), rec["task"])
        out[name] = {"hits": sum(x["hit"] for x in samples), "samples": samples}
    return out


def sweep_theme(bundle, title: str, spec: dict, task: str, catalog, prompt: str, max_new_tokens: int,
                seed_sets: bool = True) -> dict:
    """Sweep one theme's candidates over the grid (and, for activation, a seed set of its two best
    on-theme candidates over SET_GRID, `seed_set_candidate`), then recheck the best settings."""
    from ..generate import generate_variants

    words = set(spec["words"].split())
    grid = GRID if task == "activate" else REMOVAL_GRID
    base = generate_variants(bundle, prompt, {"unsteered": []}, SEEDS, max_new_tokens)
    rec = {"title": title, "task": task, "theme": spec["theme"], "words": sorted(words), "prompt": prompt,
           "grid": [f"{cond}:{s:g}" for cond, s in grid], "unsteered": judge_samples(base, words, task),
           "candidates": {}}
    def sweep_candidate(fid: str, grid: list) -> None:
        graphs = graphs_for(bundle, fid)
        variants = {f"{cond}:{s:g}": plan_for(bundle, fid, f"{cond}:{s:g}", task) for cond, s in grid}
        runs = {}
        names = list(variants)
        per = max(1, limits.MAX_ROWS // len(SEEDS))  # variants per batched generation
        for i in range(0, len(names), per):
            chunk = {n: variants[n] for n in names[i:i + per]}
            gens = generate_variants(bundle, prompt, chunk, SEEDS, max_new_tokens)
            for n, run in judged(gens, chunk, rec).items():
                runs[n] = {"hits": run["hits"], "n_features": len(variants[n]), "samples": run["samples"]}
        label = " + ".join(catalog.label(f.strip()) for f in fid.split(",")) if catalog else ""
        rec["candidates"][fid] = {"span": span_of(graphs), "label": label, "runs": runs}
        if len(graphs) > 1:
            rec["candidates"][fid]["spans"] = [[g.l_start, g.l_end] for g in graphs]

    for fid in candidates(bundle, catalog, spec):
        sweep_candidate(fid, grid)
    pair = seed_set_candidate(rec) if task == "activate" and seed_sets else None
    if pair:
        sweep_candidate(pair, SET_GRID)
    recheck(bundle, rec, max_new_tokens)
    return rec


def recheck(bundle, rec: dict, max_new_tokens: int) -> None:
    """Run the N_RECHECK best settings of the first stage (`ranked` on SEEDS alone) again on
    RECHECK_SEEDS; each gets ``recheck_hits`` and ``recheck_samples`` (in seed order) in its run
    record. Only the seeds a setting's record lacks are generated (a recorded sweep whose recheck
    had fewer seeds is completed, not redone): every row of a batched generation has its own
    sampler seed and steering, so a sample does not depend on the rows generated beside it."""
    from ..generate import generate_variants

    for fid, setting, _ in ranked(rec, stage="first")[:N_RECHECK]:
        run = rec["candidates"][fid]["runs"][setting]
        have = {x["seed"]: x for x in run.get("recheck_samples", ()) if x["seed"] in RECHECK_SEEDS}
        todo = [s for s in RECHECK_SEEDS if s not in have]
        if todo:
            specs = plan_for(bundle, fid, setting, rec["task"])
            gens = generate_variants(bundle, rec["prompt"], {setting: specs}, todo, max_new_tokens)
            have.update({x["seed"]: x for x in judged(gens, (setting,), rec)[setting]["samples"]})
        samples = [have[s] for s in RECHECK_SEEDS]
        run.update(recheck_hits=sum(x["hit"] for x in samples), recheck_samples=samples)


def rechecked(run: dict) -> bool:
    """Whether a setting's run was rechecked on all of RECHECK_SEEDS (a record of an older, smaller
    recheck does not count until `recheck` completes it)."""
    return [x["seed"] for x in run.get("recheck_samples", ())] == RECHECK_SEEDS


def on_theme(label: str, words) -> bool:
    """Whether a feature's catalog label (top tokens, contexts, promoted tokens) names a theme word:
    a presenter shows a feature that is visibly about the theme, not one that hit by chance."""
    return any(w in set(words) for w in re.findall(r"[a-z]+", label.lower()))


def ranked(rec: dict, stage: str = "final") -> list[tuple[str, str, int]]:
    """[(feature, setting, hits on SEEDS)], best first: features whose label names the theme first
    (`on_theme`), then graphs spanning >= MIN_SPAN layers, then the most hits - on SEEDS and
    RECHECK_SEEDS together where a setting was rechecked (``stage="final"``; a rechecked setting
    comes before one that was not), on SEEDS alone for ``stage="first"`` - and ties to the weaker push
    (a seed set of n features at s pushes n x s: two at s = 5 are not weaker than one at s = 7)."""
    keyed = []
    for fid, c in rec["candidates"].items():
        for name, run in c["runs"].items():
            s = float(name.split(":")[1]) * len(fid.split(","))  # the push: s for each seed of a seed set
            checked = stage == "final" and rechecked(run)
            hits = run["hits"] + run.get("recheck_hits", 0) if checked else run["hits"]
            key = (on_theme(c.get("label", ""), rec.get("words", ())), c["span"][1] - c["span"][0] + 1 >= MIN_SPAN,
                   checked, hits, -abs(s))
            keyed.append((key, fid, name, run["hits"]))
    keyed.sort(key=lambda x: x[0], reverse=True)
    return [x[1:] for x in keyed]


def choose(rec: dict) -> tuple[str, str, int] | None:
    """(feature, setting, hits on SEEDS) of the best setting by `ranked`; None if nothing was run."""
    best = ranked(rec)
    return best[0] if best else None


def controls_for(bundle, rec: dict, fid: str, setting: str, max_new_tokens: int) -> dict:
    from ..controls import generate_with_controls

    specs = plan_for(bundle, fid, setting, rec["task"])
    gens = generate_with_controls(bundle, rec["prompt"], {"steered": specs}, SEEDS, ("prompt", "random"),
                                  rec["theme"], rec["task"], max_new_tokens=max_new_tokens)
    return judged(gens, ("prompted", "random"), rec)


def current_confirm(rec: dict) -> dict | None:
    """The fresh-seed check of ``rec`` if it was made for its chosen feature and setting on
    CONFIRM_SEEDS, else None (stale: it must be run again)."""
    conf, chosen = rec.get("confirm"), rec.get("chosen") or {}
    if not conf or (conf["feature"], conf["setting"], conf["seeds"]) != (chosen.get("feature"), chosen.get("setting"),
                                                                          CONFIRM_SEEDS):
        return None
    return conf


def confirm(bundle, rec: dict, max_new_tokens: int) -> dict:
    """The chosen setting and the unsteered model again on CONFIRM_SEEDS. The chosen setting is the
    best of ~30 on SEEDS, so its hits there are biased upwards; fresh seeds give a fair count."""
    from ..generate import generate_variants

    fid, setting = rec["chosen"]["feature"], rec["chosen"]["setting"]
    specs = plan_for(bundle, fid, setting, rec["task"])
    gens = generate_variants(bundle, rec["prompt"], {"steered": specs, "unsteered": []}, CONFIRM_SEEDS,
                             max_new_tokens)
    return {"seeds": CONFIRM_SEEDS, "setting": setting, "feature": fid, **judged(gens, ("steered", "unsteered"), rec)}


N_WORDS = {2: "two", 3: "three", 4: "four"}


def example_json(rec: dict, fid: str, setting: str, graphs: list, max_new_tokens: int, preset: str) -> dict:
    """The curated example of a graded theme (``graphs``: `graphs_for` the chosen candidate)."""
    cond, s = setting.split(":")
    span = span_text(graphs)
    graph = graphs[0]
    pair = is_seed_set(fid)
    what = {"baseline": f"the {N_WORDS.get(len(graphs), len(graphs))} features together" if pair
            else "the feature alone",
            "single": f"the flow-graph features at layer {graph.seed.layer}",
            "cumulative": f"the whole flow from layer {graph.l_start} up to layer {graph.seed.layer}, "
                          "weaker at later layers"}[cond]
    n_hits = rec["chosen"]["hits"]
    run = rec["candidates"][fid]["runs"][setting]
    conf = current_confirm(rec)
    ctl = rec["controls"]
    if rec["task"] == "activate":
        strength = f"strength {float(s):g}" + (" each" if pair else "")
        first = (f"{n_hits} of 8 (unsteered: {rec['baseline_hits']} of 8; asking the model: "
                 f"{ctl['prompted']['hits']}; random directions of the same size: {ctl['random']['hits']})")
        goal = "put the theme into"
        lead = (f"Their flow graphs follow them across {span}. " if pair
                else f"This feature's flow graph follows it across {span}. ")
        how = f"steering with {what} ({strength})"
    else:
        what = what.replace(", weaker at later layers", "")  # r is the same at every layer
        first = (f"{n_hits} of 8 (unsteered: {rec['baseline_hits']} of 8; asking the model not to: "
                 f"{ctl['prompted']['hits']}; random features: {ctl['random']['hits']})")
        goal = "kept physics words out of"
        lead = "The prompt asks about physics. "
        r = f"r = {float(s):g}"
        how = {"baseline": f"scaling the physics feature by {r}",
               "single": f"scaling the physics feature and its flow-graph features at layer {graph.seed.layer} by {r}"
               }.get(cond, f"scaling the physics feature by {r} along {what}")
    # the fair count first: the fresh seeds did not take part in choosing the setting
    if conf:
        k = conf["steered"]["hits"]
        fresh = (f"gave {k} of 8 readable samples on the theme" if rec["task"] == "activate"
                 else f"{goal} {k} of 8 readable samples")
        expl = (f"{lead}On 8 fresh seeds, {how} {fresh} (unsteered: {conf['unsteered']['hits']} of 8). "
                f"On the 8 seeds it was first tried on: {first}")
    else:
        expl = f"{lead}{how[0].upper()}{how[1:]} {goal} {first}"
    if rechecked(run):
        n = len(SEEDS) + len(RECHECK_SEEDS)
        expl += f"; picked on {n} seeds ({run['hits'] + run['recheck_hits']} of {n})"
    expl += "."
    if conf:
        expl += (f" Running it shows {DEMO_SAMPLES} of the fresh samples (seeds {CONFIRM_SEEDS[0]}-"
                 f"{CONFIRM_SEEDS[DEMO_SAMPLES - 1]}); the Playground runs more.")
    if not rec.get("shipped"):
        prompted = rec["controls"]["prompted"]["hits"]
        if n_hits > max(rec["baseline_hits"], rec["controls"]["random"]["hits"]):
            ask = "asking the model" + (" not to mention physics" if rec["task"] == "remove" else "")
            others = "random features" if rec["task"] == "remove" else "random directions"
            goal = "the theme is in" if rec["task"] == "activate" else "physics is kept out of"
            vs = "worked better" if prompted > n_hits else "did as well" if prompted == n_hits else "did worse"
            counted = conf["steered"]["hits"] if conf else n_hits  # the fresh seeds' count where there is one
            why = (f"{goal} fewer than six of the eight {'fresh ' if conf else ''}samples" if counted < MIN_HITS
                   else "a flow graph of it spans a single layer")
            # the numbers, not only "did worse": a live run of two samples can show the opposite
            expl = (f"Honest result: on the first 8 seeds, steering beat the unsteered model and {others} "
                    f"({ask} {vs} there: {prompted} hits against steering's {n_hits}), "
                    f"but {why}. ") + expl
        else:
            expl = "Honest result: here steering did not beat the controls. " + expl
    ex = {"title": rec["title"], "feature": fid, "theme": rec["theme"], "explanation": expl, "preset": preset,
          "task": rec["task"], "condition": DEPRECATED_CONDITIONS.get(cond, cond),
          "layer": None if pair else graph.seed.layer,  # a seed set: each feature at its own layer
          "samples": DEMO_SAMPLES, "seed": CONFIRM_SEEDS[0],  # the Demo tab shows fresh samples, not the choosing ones
          "max_new_tokens": max_new_tokens, "prompt": rec["prompt"]}
    if rec["task"] == "activate":
        ex.update(strength=float(s), alpha=ALPHA)
    else:
        ex.update(r=float(s))
    return ex


def grade(bundle, rec: dict, n_tok: int) -> list[tuple[int, dict]]:
    """Mark a swept theme with a chosen setting and its controls ``shipped`` (convincing) and
    ``in_demo``; returns [(margin, example)] for the examples file, or [] when it stays out. The
    demo shows a theme when its feature is visibly about it and steering beat the unsteered model
    and random directions, and beat the unsteered model again on fresh seeds (`confirm`) in at
    least MIN_DEMO_FRESH of 8 (a presenter's click shows fresh samples); the margin that orders
    the examples is the fresh-seed one. The explanation says how it compares
    with asking the model."""
    fid, hits = rec["chosen"]["feature"], rec["chosen"]["hits"]
    graphs = graphs_for(bundle, fid)
    lo, hi = span_of(graphs)
    margin = hits - max(rec["baseline_hits"], rec["controls"]["random"]["hits"])
    conf = current_confirm(rec)
    fresh = None if conf is None else conf["steered"]["hits"] - conf["unsteered"]["hits"]
    # the fresh seeds' count is the unbiased one: it decides where there is one (the choosing
    # seeds' count only where the check has not been run)
    enough = conf["steered"]["hits"] >= MIN_HITS if conf is not None else hits >= MIN_HITS
    rec["shipped"] = (enough and hi - lo + 1 >= MIN_SPAN and margin > 0
                      and (fresh is None or fresh > 0))
    rec["in_demo"] = (margin > 0 and (fresh is None or (fresh > 0 and conf["steered"]["hits"] >= MIN_DEMO_FRESH))
                      and on_theme(rec["candidates"][fid].get("label", ""), rec["words"]))
    if not rec["in_demo"]:
        return []
    return [(margin if fresh is None else fresh,
             example_json(rec, fid, rec["chosen"]["setting"], graphs, n_tok, bundle.preset.name))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--out", type=Path, default=None, help="evidence folder (default: results/<preset>/demo)")
    p.add_argument("--examples", type=Path, default=None,
                   help="demo examples file (default: assets/demo_examples.json)")
    p.add_argument("--themes", default="", help="comma list of theme titles (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=36)
    p.add_argument("--rewrite-examples", action="store_true",
                   help="rebuild the examples file from the recorded sweep.json (generates only the recheck "
                   "seeds the current rules add, the controls of a theme whose choice they change, and the "
                   "fresh-seed check where missing)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from ..bundle import Bundle
    from ..catalog import Catalog
    from ..flow import build_tables
    from ..settings import TASK_DEFAULTS
    from ..presets import ASSETS

    t0 = time.time()
    bundle = Bundle.load(a.preset)
    build_tables(bundle)
    try:
        catalog = Catalog.load(bundle)
    except (FileNotFoundError, ValueError) as e:
        log.warning("no catalog: %s", e)
        catalog = None
    out = a.out or Path("results") / bundle.preset.name / "demo"
    out.mkdir(parents=True, exist_ok=True)
    wanted = [t.strip() for t in a.themes.split(",") if t.strip()]
    jobs = [(t, s, "activate") for t, s in THEMES.items() if not wanted or t in wanted]
    if not wanted or REMOVAL["title"] in wanted:
        jobs.append((REMOVAL["title"], REMOVAL, "remove"))
    recorded = json.loads((out / "sweep.json").read_text())["themes"] if (out / "sweep.json").is_file() else []
    if a.rewrite_examples:  # only rebuild the examples file from the recorded evidence
        records, jobs = recorded, []
    else:  # a partial run keeps the evidence of the themes it does not sweep again
        records = [r for r in recorded if wanted and r["title"] not in {t for t, _, _ in jobs}]
    examples = []
    for rec in tqdm(records, desc="recorded themes", disable=not a.rewrite_examples):
        n_tok = a.max_new_tokens if rec["task"] == "activate" else 64
        if a.rewrite_examples:  # a recheck the current rules widened is completed first
            recheck(bundle, rec, n_tok)
        pick = choose(rec)
        if pick is not None and (not rec.get("chosen") or (rec["chosen"]["feature"], rec["chosen"]["setting"])
                                 != pick[:2]):  # the rule changed: the new choice's controls are generated
            rec["chosen"] = {"feature": pick[0], "setting": pick[1], "hits": pick[2]}
            rec["controls"] = controls_for(bundle, rec, pick[0], pick[1], n_tok)
        if rec.get("chosen") and current_confirm(rec) is None:
            rec["confirm"] = confirm(bundle, rec, n_tok)
        if rec.get("chosen"):
            examples += grade(bundle, rec, n_tok)
    rules = {"max_perplexity": MAX_PPL, "min_distinct_2": MIN_DISTINCT2, "min_hits": MIN_HITS, "min_span": MIN_SPAN}
    order = [*THEMES, REMOVAL["title"]]

    def save() -> None:
        records.sort(key=lambda r: order.index(r["title"]) if r["title"] in order else len(order))
        (out / "sweep.json").write_text(json.dumps({"preset": bundle.preset.name, "seeds": SEEDS, "rules": rules,
                                                    "themes": records}, indent=1))

    if records:
        save()
    for title, spec, task in tqdm(jobs, desc="themes"):
        prompt = DEMO_PROMPT if task == "activate" else demo_removal_prompt(TASK_DEFAULTS[task]["prompt"])
        n_tok = a.max_new_tokens if task == "activate" else 64
        rec = sweep_theme(bundle, title, spec, task, catalog, prompt, n_tok)
        rec["baseline_hits"] = sum(x["hit"] for x in rec["unsteered"])
        pick = choose(rec)
        if pick is not None:
            fid, setting, hits = pick
            rec["chosen"] = {"feature": fid, "setting": setting, "hits": hits}
            rec["controls"] = controls_for(bundle, rec, fid, setting, n_tok)
            rec["confirm"] = confirm(bundle, rec, n_tok)
            examples += grade(bundle, rec, n_tok)
        records.append(rec)
        save()
    # most convincing first: largest margin over the unsteered model and the random control
    acts = sorted([e for e in examples if e[1]["task"] == "activate"], key=lambda e: -e[0])
    rems = [e for e in examples if e[1]["task"] == "remove"]
    path = a.examples or ASSETS / "demo_examples.json"
    # examples of other presets are kept; this preset's come from every recorded theme (graded above)
    old = json.loads(path.read_text()).get("examples", []) if path.is_file() else []
    keep = [e for e in old if e.get("preset", "default") != bundle.preset.name]
    path.write_text(json.dumps({"examples": [e[1] for e in acts + rems] + keep,
                                "evidence": f"results/{bundle.preset.name}/demo/sweep.json"}, indent=1) + "\n")
    summary = [{"title": r["title"], "chosen": r.get("chosen"), "unsteered": r["baseline_hits"],
                "prompted": r.get("controls", {}).get("prompted", {}).get("hits"),
                "random": r.get("controls", {}).get("random", {}).get("hits"), "shipped": r.get("shipped")}
               for r in records]
    print(json.dumps({"seconds": round(time.time() - t0), "themes": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
