"""Prompt logprobs: the logprob of each prompt token given the ones before it.

A request with ``SamplingParams.prompt_logprobs = k`` gets, on its first
:class:`~disagg.engine.outputs.RequestOutput`, one entry per prompt position:
``None`` at position 0, then for ``i >= 1`` a :class:`TokenLogprobs` with the
logprob of prompt token ``i`` and the ``k`` most likely tokens there. Position
``i``'s distribution is the model's output at position ``i - 1``, so every
prefill chunk computes lm_head over all its rows for such requests (the
ordinary path computes only the sampling row)::

    chunk computes positions [s, s+n):  rows at positions p in [s, min(s+n, P-1))
                                        give the entry for position p+1, target
                                        token_ids[p+1] (known: it is the prompt)

The three sides:

* driver, when laying out a step: :func:`plan_rows` says which positions of a
  scheduled chunk need rows; ``StepInput.prompt_logprobs`` lists them as
  ``[first_row, k, [targets]]``;
* rank 0, after the forward pass: :func:`compute` runs lm_head + log-softmax
  over those rows (a bounded number of rows at a time, so a long chunk never
  holds a ``(chunk, vocab)`` block) and returns plain lists;
* driver, after the step: :func:`record` files the entries in each request's
  position-indexed list (a chunk computed again after a preemption overwrites
  the same values).

Cached prefix blocks would skip positions, so a request that still needs its
prompt logprobs does not reuse the prefix cache (vLLM does the same); its own
blocks are still cached for others. A decode node that loads KV from a remote
prefill never sees these logits, so such requests must be prefilled locally
(:attr:`SamplingParams.needs_local_prefill`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disagg.engine.request import Request
from disagg.logprobs import TokenLogprobs

ROWS_PER_PASS = 256
"""Rows whose full-vocabulary logits are materialised at once."""


def plan_rows(req: Request, num_new_tokens: int) -> range:
    """Positions ``p`` of this step's chunk whose output gives prompt entry ``p + 1``."""
    if not req.needs_prompt_logprobs:
        return range(0)
    start = req.num_computed_tokens
    return range(start, min(start + num_new_tokens, req.num_prompt_tokens - 1))


def step_spans(scheduled: list[tuple[Request, int]], first_rows: list[int]) -> list[list]:
    """``StepInput.prompt_logprobs`` for ``scheduled`` whose chunks start at ``first_rows``."""
    spans = []
    for (req, n), row in zip(scheduled, first_rows):
        pos = plan_rows(req, n)
        if pos:
            targets = req.token_ids[pos.start + 1:pos.stop + 1]
            spans.append([row, req.params.prompt_logprobs, targets])
    return spans


@torch.inference_mode()
def compute(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
            spans: list[list]) -> dict | None:
    """Rank 0: logprobs of the span rows of ``hidden`` (T, hidden), as plain lists.

    Returns ``{"chosen": [R], "top_ids": [R][k_max], "top_vals": [R][k_max]}``
    in span order (None when there are no spans); ``k_max`` is the largest
    ``k`` of the step, cut per span by :func:`record`.
    """
    if not spans:
        return None
    device = hidden.device
    rows = torch.cat([torch.arange(r, r + len(t), device=device) for r, _, t in spans])  # (R,)
    targets = torch.tensor([x for _, _, t in spans for x in t], dtype=torch.long,
                           device=device)                                             # (R,)
    k_max = max(k for _, k, _ in spans)
    chosen, top_ids, top_vals = [], [], []
    for s in range(0, rows.shape[0], ROWS_PER_PASS):
        logits = compute_logits(hidden[rows[s:s + ROWS_PER_PASS]]).float()            # (S, V)
        logp = torch.log_softmax(logits, dim=-1)                                      # (S, V)
        chosen.append(logp.gather(1, targets[s:s + ROWS_PER_PASS, None])[:, 0])        # (S,)
        if k_max > 0:
            vals, ids = torch.topk(logp, min(k_max, logp.shape[1]), dim=-1)            # (S, k)
            top_vals.append(vals)
            top_ids.append(ids)
    out = {"chosen": torch.cat(chosen).tolist(), "top_ids": [], "top_vals": []}
    if top_ids:
        out["top_ids"] = torch.cat(top_ids).tolist()
        out["top_vals"] = torch.cat(top_vals).tolist()
    return out


def record(scheduled: list[tuple[Request, int]], result: dict | None) -> None:
    """Driver: file :func:`compute`'s rows in the requests that asked for them.

    Must run before the scheduler advances ``num_computed_tokens`` (it
    replays :func:`plan_rows` to match rows to positions).
    """
    r = 0
    for req, n in scheduled:
        pos = plan_rows(req, n)
        if not pos:
            continue
        if result is None:
            raise RuntimeError("the model runner returned no prompt logprobs for a step "
                               "that asked for them")
        k = req.params.prompt_logprobs
        for p in pos:
            top = list(zip(result["top_ids"][r][:k], result["top_vals"][r][:k])) if k else []
            req.prompt_logprobs[p + 1] = TokenLogprobs(req.token_ids[p + 1],
                                                       result["chosen"][r], top)
            r += 1
