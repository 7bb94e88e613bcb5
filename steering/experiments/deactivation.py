"""``python -m steering.experiments deactivation``: Table 1 and the activation change vs r (paper
§5.2, App. A.2, Table 1, Fig. 7).

Protocol (`steering.groups.deactivation_check`): ``--texts`` held-out passages of one domain
(paper: 35 FineWeb texts; here the prose domain stands in for FineWeb), ``--tokens`` random non-BOS
tokens each, layers at the paper's relative depths (Gemma 2 2B's 6, 12, 18 of 26 scaled to the
model), up to ``--max-targets`` active targets per layer-token, single-predecessor groups only
(Table 1). Each method rescales its chosen predecessor(s) by r at that token; ``exhaustive`` keeps
the best single active predecessor. One resumable unit per r value.
"""

from __future__ import annotations

import logging

from ..groups import DEACTIVATION_METHODS, SINGLE_GROUPS, summarize
from ..training.corpus import DOMAINS
from . import common
from .fanout import Job, run_jobs

log = logging.getLogger(__name__)
PAPER_LAYERS, PAPER_N_LAYERS = (6, 12, 18), 26  # Gemma 2 2B (App. A.2)
PAPER_TABLE1 = {"top1_cosine": {"activation_change": 0.75, "success_rate": 0.65},
                "top1_pearson": {"activation_change": 0.74, "success_rate": 0.65},
                "exhaustive": {"activation_change": 0.83, "success_rate": 0.73}}


def scaled_layers(n_layers: int) -> list[int]:
    """The paper's layers 6, 12, 18 of 26 at the same relative depth in an n-layer model."""
    return sorted({min(n_layers - 1, max(1, round(l * n_layers / PAPER_N_LAYERS))) for l in PAPER_LAYERS})


def _summaries(cases, methods: list[str], key) -> dict[str, dict[str, dict]]:
    """Method summaries per value of ``key(case)`` (a group or a layer). The success-rate
    denominator is the method's cases; n_cases counts the distinct targets of that slice."""
    out = {}
    for value in sorted({key(c) for c in cases}, key=str):
        part = [c for c in cases if key(c) == value]
        n = len({(c.text, c.token, c.target) for c in part})
        out[str(value)] = {m: s._asdict() for m, s in summarize(part, dict.fromkeys(methods, n)).items()}
    return out


def run_r(bundle, texts: list[str], layers: list[int], methods: list[str], r: float, tokens: int,
          max_targets: int, seed: int, loss: bool, max_length: int, show: bool,
          pearson_fit: list[str] | None = None, pearson_tokens: int = 0) -> dict:
    """One unit (one r): Table 1 cases on ``texts``. A module-level function of the bundle, so a
    Ray worker can run it (`fanout.Job`); ``pearson_fit``: training passages that the
    top1_pearson tables are fitted on first (each worker fits its own, the same way)."""
    from ..flow import pearson_tables
    from ..groups import deactivation_check

    if pearson_fit:
        pearson_tables(bundle, pearson_fit, layers=layers, max_tokens=pearson_tokens, max_length=max_length)
    rep = deactivation_check(bundle, texts, layers=layers, tokens_per_text=tokens,
                             max_targets=max_targets, methods=methods, r=r, seed=seed,
                             single_only=True, compute_loss=loss, max_length=max_length,
                             progress=common.progress(f"deactivation r={r:g}", disable=not show))
    changes = sorted(c.activation_change for c in rep.cases if c.method == methods[0])
    return {"settings": rep.settings, "summary": {m: s._asdict() for m, s in rep.summary.items()},
            "by_group": _summaries(rep.cases, methods, lambda c: c.group),
            "by_layer": _summaries(rep.cases, methods, lambda c: int(c.target.split("/")[0])),
            "n_cases": len(rep.cases),
            "activation_change_quantiles": {methods[0]: [round(changes[int(q * (len(changes) - 1))], 4)
                                                         for q in (0.1, 0.25, 0.5, 0.75, 0.9)] if changes else []}}


def check(args) -> dict:
    """Validate the options before any model is loaded."""
    for name in ("texts", "tokens", "max_targets", "max_length", "sweep_texts", "pearson_texts"):
        common.check_positive("--" + name.replace("_", "-"), getattr(args, name))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in DEACTIVATION_METHODS]
    if bad or not methods:
        raise ValueError(f"unknown --methods {bad or args.methods!r}; valid: {', '.join(DEACTIVATION_METHODS)}")
    if args.domain not in DOMAINS:
        raise ValueError(f"unknown --domain {args.domain!r}; valid: {', '.join(DOMAINS)}")
    r_sweep = common.parse_floats(args.r_sweep, "--r-sweep") if args.r_sweep else []
    for r in [args.r, *r_sweep]:
        if not -64 <= r <= 1:
            raise ValueError(f"r = {r:g} is out of range; allowed: -64..1 (1 = no change, 0 = remove)")
    layers = common.parse_ints(args.layers, "--layers") if args.layers else None
    return {"methods": methods, "r_sweep": r_sweep, "layers": layers}


def run(args, bundle) -> dict:
    from ..flow import pearson_tables
    from . import figures

    opts = check(args)
    methods = opts["methods"]
    layers = opts["layers"] or scaled_layers(bundle.n_layers)
    for l in layers:
        if (l, "res") not in bundle.saes:
            raise ValueError(f"--layers: no residual SAE at layer {l}; layers: {list(bundle.layers)}")
    folder = common.out_dir(args.out, bundle, "deactivation")
    units = common.Units(folder / "units", args.command_line, common.sae_fingerprint(bundle))
    texts = common.domain_texts(args.domain, args.texts, args.seed, args.passage_chars)
    if not texts:
        raise ValueError(f"domain {args.domain!r} has no held-out passages")
    pearson, fit = {}, None
    if "top1_pearson" in methods:  # data-based matching, fitted on training-split text (not the evaluated texts)
        fit = common.domain_texts(args.domain, args.pearson_texts, args.seed, args.passage_chars, split="train")
        pearson = {"texts": len(fit), "split": "train", "max_tokens": args.pearson_tokens}
    base = {"preset": bundle.preset.name, "domain": args.domain, "tokens": args.tokens, "layers": layers,
            "max_targets": args.max_targets, "methods": methods, "seed": args.seed, "loss": args.loss,
            "max_length": args.max_length, "passage_chars": args.passage_chars, "pearson": pearson}
    jobs = []
    for r in dict.fromkeys([args.r, *opts["r_sweep"]]):
        sub = texts if r == args.r else texts[:args.sweep_texts]
        jobs.append(Job(f"r={r:g}", {**base, "r": r, "n_texts": len(sub)}, run_r, {
            "texts": sub, "layers": layers, "methods": methods, "r": r, "tokens": args.tokens,
            "max_targets": args.max_targets, "seed": args.seed, "loss": args.loss,
            "max_length": args.max_length, "show": not args.quiet and not args.workers,
            "pearson_fit": fit if args.workers else None, "pearson_tokens": args.pearson_tokens}))

    def fit_once() -> None:  # serially the tables are fitted once and kept on the bundle
        if fit:
            pearson_tables(bundle, fit, layers=layers, max_tokens=args.pearson_tokens, max_length=args.max_length)

    done = run_jobs(units, jobs, bundle, args.workers, args.preset, args.device, args.ray_address, prepare=fit_once)
    by_r = {j.name[2:]: done[j.name] for j in jobs}
    main = by_r[f"{args.r:g}"]
    summary = {
        "command": args.command_line, "preset": bundle.preset.name, "model": bundle.preset.model,
        "settings": {**base, "r": args.r, "r_sweep": opts["r_sweep"], "texts": len(texts),
                     "sweep_texts": min(args.sweep_texts, len(texts)), "split": "heldout", "single_only": True},
        "table1": main["summary"], "by_group": main["by_group"], "by_layer": main["by_layer"],
        "paper_table1": PAPER_TABLE1, "groups": list(SINGLE_GROUPS),
        "vs_r": {r: {"n_texts": u["settings"]["n_texts"], "summary": u["summary"]} for r, u in by_r.items()},
        "units": units.report(),
    }
    summary["headline"] = {"layers": layers, "n_targets": main["summary"][methods[0]]["n_cases"],
                           "table1": {m: {"activation_change": round(s["activation_change"], 3),
                                          "success_rate": round(s["success_rate"], 3),
                                          "with_predecessor": s["n_with_predecessor"]}
                                      for m, s in main["summary"].items()}}
    summary["figures"] = common.save_figure(figures.table_figure(main["summary"], main["by_group"]),
                                            folder / "table1.html")
    if len(by_r) > 1:
        summary["figures"] += common.save_figure(figures.deactivation_r_figure(by_r, methods), folder / "vs_r.html")
    summary["wall_seconds"] = common.elapsed(args)
    common.write_json(folder / "summary.json", summary)
    return summary


def register(sub, parent) -> None:
    p = sub.add_parser("deactivation", parents=[parent], help="Table 1: deactivating predecessors (paper §5.2)")
    p.add_argument("--texts", type=int, default=35, help="held-out passages (paper: 35)")
    p.add_argument("--tokens", type=int, default=5, help="random non-BOS tokens per text (paper: 5)")
    p.add_argument("--max-targets", type=int, default=25, help="targets per layer-token (paper: 25)")
    p.add_argument("--layers", default="", help="comma-separated layers (default: the paper's 6, 12, 18 of 26 "
                   "at the same relative depth)")
    p.add_argument("--methods", default=",".join(DEACTIVATION_METHODS), help=f"of {', '.join(DEACTIVATION_METHODS)}")
    p.add_argument("--r", type=float, default=0.0, help="rescale factor of the table (0 = remove)")
    p.add_argument("--r-sweep", default="0.5,-1,-2,-4",
                   help="extra r values for the vs-r curves (Fig. 7 style); write --r-sweep=-1,-2")
    p.add_argument("--sweep-texts", type=int, default=12, help="texts used for each extra r (default: %(default)s)")
    p.add_argument("--domain", default="prose", help="texts' domain (prose stands in for FineWeb)")
    p.add_argument("--loss", action="store_true", help="also the relative loss change (slower)")
    p.add_argument("--max-length", type=int, default=128, help="tokens read per text (default: %(default)s)")
    p.add_argument("--passage-chars", type=int, default=1000, help="passage size of held-out documents")
    p.add_argument("--pearson-texts", type=int, default=32, help="training passages for top1_pearson tables")
    p.add_argument("--pearson-tokens", type=int, default=4096, help="tokens for top1_pearson tables")
    p.set_defaults(run=run, check=check, smoke_values={"texts": 2, "tokens": 2, "max_targets": 3, "sweep_texts": 1,
                                                       "r_sweep": "-1", "pearson_texts": 2, "pearson_tokens": 64,
                                                       "max_length": 32})
