"""Turns one step's logits into next tokens (and optional log-probabilities).

Per row, in order::

    penalties   ─▶ repetition, frequency/presence, logit_bias (rows that ask only;
                   :mod:`disagg.engine.penalties`)
    greedy row  ─▶ argmax (ties → lowest id, same as transformers greedy)
    other rows  ─▶ logits / T ─▶ keep top_k ─▶ keep nucleus top_p ─▶ multinomial

Greedy rows are handled in one vectorised argmax; sampled rows loop, each
drawing from its own ``torch.Generator`` when one is given, so a seeded
request gets the same tokens whatever else shares its batch.

Log-probabilities are always those of the *raw* distribution (log-softmax of
the unpenalised, untempered, unfiltered logits), like vLLM's default "raw"
mode: a penalty or bias changes which token is picked, not the logprobs
reported for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from disagg.engine.penalties import TokenHistory, apply_penalties
from disagg.logprobs import TokenLogprobs
from disagg.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (or 64 random bits if None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    gen.manual_seed(seed)
    return gen


@dataclass
class SamplerOutput:
    """One step's result: a token per row and, where asked for, its logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Stateless sampler; call it with ``(B, V)`` logits and one params per row."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: list[TokenHistory | None] | None = None,
    ) -> SamplerOutput:
        """Pick one token per row of ``logits`` (B, V) under ``params[row]``.

        ``histories[row]`` (prompt and output ids) is needed for rows whose
        params have penalties or a logit bias; other rows may pass None.
        """
        self._check_inputs(logits, params, generators)
        logits = logits.float()                                       # (B, V) raw
        picked = apply_penalties(logits, params, histories)           # (B, V)
        batch = logits.shape[0]
        token_ids = torch.empty(batch, dtype=torch.long, device=logits.device)

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if greedy_rows:
            idx = torch.tensor(greedy_rows, dtype=torch.long, device=logits.device)
            token_ids[idx] = picked.index_select(0, idx).argmax(dim=-1)  # (G,)
        for i, p in enumerate(params):
            if not p.greedy:
                token_ids[i] = _sample_row(picked[i], p, generators[i])

        ids = token_ids.tolist()
        return SamplerOutput(token_ids=ids, logprobs=_compute_logprobs(logits, params, ids))

    @staticmethod
    def _check_inputs(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> None:
        """Raise ValueError on mismatched shapes or rows with no usable logit."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"need one SamplingParams and one generator per logits row: "
                f"{batch} rows, {len(params)} params, {len(generators)} generators")
        if batch == 0:
            return
        row_max = logits.amax(dim=-1)                                 # (B,) NaN propagates
        bad = (~torch.isfinite(row_max)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"logits rows {bad} have a NaN/+inf value or no finite value at all")


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Draw one token id (0-d long tensor) from ``row`` (V,) under ``p``."""
    scaled = row / p.temperature                                      # (V,)
    vocab = scaled.shape[0]
    if p.top_k_enabled and p.top_k < vocab:
        cand_logits, cand_ids = torch.topk(scaled, p.top_k)           # (K,) sorted desc
    elif p.top_p < 1.0:
        cand_logits, cand_ids = torch.sort(scaled, descending=True)   # (V,)
    else:
        probs = torch.softmax(scaled, dim=-1)                         # (V,)
        return torch.multinomial(probs, 1, generator=gen)[0]

    probs = torch.softmax(cand_logits, dim=-1)                        # (K,) descending
    if p.top_p < 1.0:
        # Keep token j while the mass *before* it is < top_p: the smallest
        # prefix whose mass reaches top_p. The most likely token is always kept:
        # a top_p below float32's smallest value (5e-324) rounds to 0 in the
        # comparison and would otherwise mask every token.
        mass_before = torch.cumsum(probs, dim=-1) - probs             # (K,)
        drop = mass_before >= p.top_p                                 # (K,)
        drop[0] = False
        probs = probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(probs, 1, generator=gen)[0]
    return cand_ids[choice]


def _compute_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], ids: list[int]
) -> list[TokenLogprobs | None]:
    """Raw log-softmax logprobs for the rows whose params ask for them."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx), dim=-1)     # (R, V)
    chosen_ids = torch.tensor([ids[i] for i in rows], dtype=torch.long, device=logits.device)
    chosen = logp.gather(1, chosen_ids[:, None])[:, 0].tolist()       # (R,)
    k_max = min(max(params[i].logprobs for i in rows), logp.shape[1])
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k_max > 0:
        vals, tids = torch.topk(logp, k_max, dim=-1)                  # (R, k_max) desc
        top_vals, top_ids = vals.tolist(), tids.tolist()
    for r, i in enumerate(rows):
        k = params[i].logprobs
        top = list(zip(top_ids[r][:k], top_vals[r][:k]))
        out[i] = TokenLogprobs(token_id=ids[i], logprob=chosen[r], top=top)
    return out
