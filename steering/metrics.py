"""Local text-quality measures, implemented once: perplexity under the unsteered model and
distinct-n ratios (repetition). Generation metrics (`steering.generate.add_local_metrics`) and
the offline judge's coherence score (`steering.judging.offline`) both use them."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

PerplexityFn = Callable[[list[str]], list[float | None]]
LOGSOFTMAX_ROWS = 4  # rows per log-softmax over the vocabulary (bounds its memory)


def distinct_n(items: list, n: int) -> float:
    """Share of distinct n-grams among all n-grams of a token or word list (1.0 = no repetition)."""
    grams = [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def sequence_perplexity(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                        rows: int = LOGSOFTMAX_ROWS) -> torch.Tensor:
    """exp(mean NLL of the targets where ``mask`` is 1), per row.

    logits [b, n, vocab] at the positions that predict targets [b, n]; mask [b, n] -> [b]. The
    log-softmax runs ``rows`` rows at a time: the float logits of a big batch would double in memory."""
    targets, mask = targets.to(logits.device), mask.to(logits.device).float()
    lp = torch.cat([logits[i:i + rows].float().log_softmax(-1).gather(-1, targets[i:i + rows, :, None])[..., 0]
                    for i in range(0, len(logits), rows)])  # [b, n]
    return (-(lp * mask).sum(1) / mask.sum(1)).exp()


def model_perplexity_fn(model, tokenizer, lock=None, prefix: str = "", batch_size: int = LOGSOFTMAX_ROWS,
                        ) -> PerplexityFn:
    """A perplexity function for the offline judge: exp(mean NLL of each text's tokens given
    ``prefix``) under ``model`` (pass the unsteered base model; hold the bundle's lock so that no
    steering hook is active). Texts without tokens get None. ``batch_size`` texts per forward:
    their float logits over the whole vocabulary exist at once (4 x 160 tokens x 49,152 x 4 bytes
    = 126 MB for the default model; 16 rows held 0.5 GB, issue 20)."""
    ctx = tokenizer(prefix, add_special_tokens=True).input_ids if prefix else []
    if not ctx:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [bos]
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(texts)
        ids_list = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        todo = [i for i, ids in enumerate(ids_list) if ids]
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            width = len(ctx) + max(len(ids_list[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)  # [b, seq], right-padded
            mask = torch.zeros(len(rows), width, dtype=torch.long)  # [b, seq]
            for r, i in enumerate(rows):
                seq = ctx + ids_list[i]
                ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            with lock if lock is not None else nullcontext():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [b, seq, V]
            # positions len(ctx) - 1 .. seq - 2 predict the text's tokens len(ctx) .. seq - 1
            ppl = sequence_perplexity(logits[:, len(ctx) - 1:-1], ids[:, len(ctx):], mask[:, len(ctx):]).cpu()
            for r, i in enumerate(rows):
                out[i] = float(ppl[r])
        return out

    return fn


def bundle_perplexity_fn(bundle, prefix: str = "") -> PerplexityFn:
    """``model_perplexity_fn`` on a Bundle's model, under its lock (so never with steering hooks)."""
    return model_perplexity_fn(bundle.model, bundle.tokenizer, bundle.lock, prefix)
