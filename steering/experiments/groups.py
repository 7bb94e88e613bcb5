"""``python -m steering.experiments groups``: predecessor-group shares per layer and the predecessor
scores of each group (paper §5.1, App. A.1).

Protocol: ``--texts`` random held-out passages per domain (paper: 250 per dataset), ``--tokens``
random non-BOS tokens each (paper: 5), every active residual feature at every layer, classified by
`steering.groups.predecessor_groups` (top-1 cosine). One resumable unit per domain holds the
group counts per layer, score histograms and a seeded subsample of the scores (the samples the
Mann-Whitney tests compare; with ~10^5-10^6 cases per group a subsample keeps files small and
changes no conclusion at p < 0.001).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from ..groups import GROUPS, group_scores, predecessor_groups
from ..training.corpus import DOMAINS
from . import common
from .fanout import Job, run_jobs

PAPER_DOMAINS = ("prose", "stories", "math", "code")  # FineWeb, TinyStories, AutoMathText, Python code

log = logging.getLogger(__name__)
SCORES = ("s_res", "s_mlp", "s_attn")
SCORE_NAMES = {"s_res": "s(R)", "s_mlp": "s(M)", "s_attn": "s(A)"}
GROUP_SITE = {"s_res": "RES", "s_mlp": "MLP", "s_attn": "ATT"}
BINS = np.linspace(0.0, 1.0, 41)  # score histogram edges (cosines; values outside are clipped)
BATCH_TEXTS = 8


def run_domain(bundle, domain: str, texts: list[str], tokens: int, seed: int, max_length: int,
               sample_cap: int, show: bool) -> dict:
    """Counts per layer and group, score histograms / sums and a score subsample for one domain."""
    counts: dict[int, dict[str, int]] = {}
    values: dict[str, dict[str, list]] = {g: {s: [] for s in SCORES} for g in GROUPS}
    batches = [texts[i:i + BATCH_TEXTS] for i in range(0, len(texts), BATCH_TEXTS)]
    for bi, batch in enumerate(common.progress(f"groups {domain}", disable=not show)(batches)):
        recs = predecessor_groups(bundle, batch, tokens, seed=seed * 7919 + bi, max_length=max_length)
        for r in recs:
            row = counts.setdefault(r.layer, dict.fromkeys(GROUPS, 0))
            row[r.group] += 1
        for g, by_score in group_scores(recs).items():
            for s, v in by_score.items():
                if v:
                    values[g][s].append(np.asarray(v, dtype=np.float32))
    rng = np.random.default_rng(seed)
    scores = {}
    for g in GROUPS:
        scores[g] = {}
        for s in SCORES:
            v = np.concatenate(values[g][s]) if values[g][s] else np.zeros(0, np.float32)
            sub = rng.choice(v, size=min(sample_cap, v.size), replace=False) if v.size else v
            hist, _ = np.histogram(np.clip(v, BINS[0], BINS[-1]), BINS)
            scores[g][s] = {"n": int(v.size), "sum": float(v.sum(dtype=np.float64)), "hist": hist.tolist(),
                            "sample": [round(float(x), 4) for x in sub]}
    return {"n_texts": len(texts), "counts": {str(l): c for l, c in sorted(counts.items())}, "scores": scores}


def shares_from_counts(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per layer, each group's share of the cases (sums to 1 per layer)."""
    out = {}
    for l, c in counts.items():
        total = sum(c.values())
        out[l] = {g: (c.get(g, 0) / total if total else 0.0) for g in GROUPS}
    return out


def add_counts(parts: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for counts in parts:
        for l, c in counts.items():
            row = out.setdefault(l, dict.fromkeys(GROUPS, 0))
            for g, n in c.items():
                row[g] += n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def mann_whitney(units: dict[str, dict]) -> dict:
    """Pairwise two-sided Mann-Whitney U tests between groups, per score, on the pooled subsamples
    (paper §5.1); plus, per score s(P), groups containing P against those that do not. ``auc`` =
    U / (n1 n2): the probability that a case of the first group has the higher score."""
    from scipy.stats import mannwhitneyu

    pooled = {g: {s: np.asarray([x for u in units.values() for x in u["scores"][g][s]["sample"]])
                  for s in SCORES} for g in GROUPS}

    def test(a: np.ndarray, b: np.ndarray) -> dict | None:
        if a.size < 2 or b.size < 2:
            return None
        res = mannwhitneyu(a, b, alternative="two-sided")
        return {"n1": int(a.size), "n2": int(b.size), "U": float(res.statistic), "p": float(res.pvalue),
                "auc": round(float(res.statistic) / (a.size * b.size), 4),
                "median1": round(float(np.median(a)), 4), "median2": round(float(np.median(b)), 4)}

    pairwise = {}
    for s in SCORES:
        for g1, g2 in itertools.combinations(GROUPS, 2):
            r = test(pooled[g1][s], pooled[g2][s])
            if r is not None:
                pairwise[f"{SCORE_NAMES[s]}: {g1} vs {g2}"] = r
    contains = {}
    for s in SCORES:
        site = GROUP_SITE[s]
        with_p = np.concatenate([pooled[g][s] for g in GROUPS if site in g.split("+")])
        without = np.concatenate([pooled[g][s] for g in GROUPS if site not in g.split("+")])
        r = test(with_p, without)
        if r is not None:
            contains[f"{SCORE_NAMES[s]}: groups with {site} vs without"] = r
    n_sig = sum(1 for r in pairwise.values() if r["p"] < 1e-3)
    return {"contains_vs_not": contains, "pairwise": pairwise,
            "pairwise_significant_p<0.001": f"{n_sig}/{len(pairwise)}"}


def score_summary(units: dict[str, dict]) -> dict:
    """Per group and score: total cases, mean (all cases), median (subsample), pooled histogram."""
    out = {}
    for g in GROUPS:
        out[g] = {}
        for s in SCORES:
            n = sum(u["scores"][g][s]["n"] for u in units.values())
            total = sum(u["scores"][g][s]["sum"] for u in units.values())
            sample = [x for u in units.values() for x in u["scores"][g][s]["sample"]]
            hist = np.sum([u["scores"][g][s]["hist"] for u in units.values()], axis=0).tolist()
            out[g][SCORE_NAMES[s]] = {"n": n, "mean": round(total / n, 4) if n else None,
                                      "median": round(float(np.median(sample)), 4) if sample else None,
                                      "hist": hist}
    return out


def chance_by_layer(bundle, layers: list[int]) -> dict[str, dict[str, float]] | None:
    """Per layer, the group shares random top-1 matches would give (`groups.chance_shares`), with
    p = k / width of each predecessor SAE (TopK); None where an SAE has no fixed k (e.g. JumpReLU:
    its activity rate would have to be measured)."""
    from ..groups import chance_shares, pred_keys

    out = {}
    for layer in layers:
        p = {}
        for name, key in pred_keys(bundle, layer).items():
            k = getattr(bundle.sae(*key).cfg, "k", None)
            if k is None:
                return None
            p[name] = int(k) / bundle.width(*key)
        out[str(layer)] = {g: round(v, 4) for g, v in chance_shares(p).items()}
    return out


def phases(shares: dict[str, dict[str, float]]) -> dict:
    """Per layer, the dominant non-RES group and the RES share (a compact view of the paper's three
    phases: early layers build features in modules, middle layers carry them, late layers process)."""
    return {l: {"RES_share": round(s["RES"], 3),
                "top_group": max(s, key=s.get),
                "from_nowhere": round(s["From nowhere"], 3)} for l, s in shares.items()}


def check(args) -> list[str]:
    """Validate the options before any model is loaded; returns the domains."""
    for name in ("texts", "tokens", "max_length", "passage_chars", "sample_cap"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    # default: the four stand-ins of the paper's datasets (App. A.1); "everyday" on request
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else list(PAPER_DOMAINS)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ValueError(f"unknown domains {bad or args.domains!r}; valid: {', '.join(DOMAINS)}")
    return domains


def run(args, bundle) -> dict:
    """The ``groups`` command: units per domain, shares, score summaries, tests, figures."""
    from . import figures

    domains = check(args)
    folder = common.out_dir(args.out, bundle, "groups")
    units = common.Units(folder / "units", args.command_line, common.sae_fingerprint(bundle))
    jobs = []
    for domain in domains:
        texts = common.domain_texts(domain, args.texts, args.seed, args.passage_chars)
        if not texts:
            raise ValueError(f"domain {domain!r} has no held-out passages of at least 200 characters")
        settings = {"domain": domain, "texts": args.texts, "n_texts": len(texts), "tokens": args.tokens,
                    "seed": args.seed, "max_length": args.max_length, "passage_chars": args.passage_chars,
                    "sample_cap": args.sample_cap, "method": "top1_cosine", "preset": bundle.preset.name}
        jobs.append(Job(f"domain={domain}", settings, run_domain,
                        {"domain": domain, "texts": texts, "tokens": args.tokens, "seed": args.seed,
                         "max_length": args.max_length, "sample_cap": args.sample_cap,
                         "show": not args.quiet and not args.workers}))
    done = run_jobs(units, jobs, bundle, args.workers, args.preset, args.device, args.ray_address)
    results = {d: done[f"domain={d}"] for d in domains}
    counts = add_counts([u["counts"] for u in results.values()])
    shares = shares_from_counts(counts)
    summary = {
        "command": args.command_line, "preset": bundle.info()["preset"], "model": bundle.preset.model,
        "settings": {"texts_per_domain": args.texts, "tokens_per_text": args.tokens, "seed": args.seed,
                     "max_length": args.max_length, "passage_chars": args.passage_chars,
                     "sample_cap": args.sample_cap, "split": "heldout", "method": "top1_cosine",
                     "domains": domains},
        "n_texts": {d: u["n_texts"] for d, u in results.items()},
        "n_cases": sum(sum(c.values()) for c in counts.values()),
        "shares": shares,
        "shares_by_domain": {d: shares_from_counts(u["counts"]) for d, u in results.items()},
        "counts": counts,
        "phases": phases(shares),
        "chance": chance_by_layer(bundle, [int(l) for l in shares]),
        "scores": score_summary(results),
        "mann_whitney": mann_whitney(results),
        "units": units.report(),
    }
    summary["figures"] = (common.save_figure(figures.shares_figure(shares, "all domains"), folder / "shares.html")
                          + common.save_figure(figures.score_figure(summary["scores"], BINS), folder / "scores.html"))
    summary["headline"] = {
        "n_texts": summary["n_texts"], "n_cases": summary["n_cases"],
        "RES_share_by_layer": {l: round(s["RES"], 3) for l, s in shares.items()},
        "mann_whitney_contains_vs_not": {k: {"auc": v["auc"], "p": v["p"]}
                                         for k, v in summary["mann_whitney"]["contains_vs_not"].items()},
        "pairwise_significant": summary["mann_whitney"]["pairwise_significant_p<0.001"]}
    summary["wall_seconds"] = common.elapsed(args)
    common.write_json(folder / "summary.json", summary)
    return summary


def register(sub, parent) -> None:
    p = sub.add_parser("groups", parents=[parent], help="predecessor-group shares per layer (paper §5.1)")
    p.add_argument("--texts", type=int, default=250, help="held-out passages per domain (paper: 250)")
    p.add_argument("--tokens", type=int, default=5, help="random non-BOS tokens per text (paper: 5)")
    p.add_argument("--domains", default="", help=f"comma-separated subset of {', '.join(DOMAINS)} "
                   f"(default: {', '.join(PAPER_DOMAINS)})")
    p.add_argument("--max-length", type=int, default=128, help="tokens read per text (default: %(default)s)")
    p.add_argument("--passage-chars", type=int, default=1000, help="held-out documents are cut into passages "
                   "of about this many characters (default: %(default)s)")
    p.add_argument("--sample-cap", type=int, default=1000,
                   help="scores kept per (domain, group, score) for the Mann-Whitney tests (default: %(default)s)")
    p.set_defaults(run=run, check=check, smoke_values={"texts": 2, "tokens": 2, "max_length": 32, "sample_cap": 50})
