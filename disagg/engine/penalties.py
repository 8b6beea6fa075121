"""Logit adjustments that depend on a row's token history: the OpenAI penalties.

Applied by the sampler to the rows whose :class:`SamplingParams` ask for any,
before temperature, top-k and top-p (vLLM's order), in this order::

    repetition_penalty  over tokens in prompt + output (HF / vLLM rule):
                        logit > 0 -> logit / penalty, else logit * penalty
    frequency/presence  over output tokens only (OpenAI's formula):
                        logit -= count * frequency_penalty + (count > 0) * presence_penalty
    logit_bias          logit += bias[token]

Rows that use none of these cost nothing: they are neither copied nor counted.
For the others the work is one copy of the logits and, beyond that,
proportional to their histories: the distinct ``(row, token)`` pairs are found
with ``torch.unique`` and only those logits are read and rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from disagg.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenHistory:
    """A row's tokens so far: ``token_ids`` is prompt then output, split at
    ``num_prompt_tokens`` (a request's own list is passed, not copied)."""

    token_ids: Sequence[int]
    num_prompt_tokens: int

    @property
    def prompt(self) -> Sequence[int]:
        """The prompt's token ids."""
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output(self) -> Sequence[int]:
        """The generated token ids."""
        return self.token_ids[self.num_prompt_tokens:]


def _per_row(values: list[float], rows: list[int], batch: int,
             device: torch.device) -> torch.Tensor:
    """(batch,) fp32 holding ``values[j]`` at ``rows[j]`` (0 elsewhere)."""
    full = [0.0] * batch
    for r, v in zip(rows, values):
        full[r] = v
    return torch.tensor(full, device=device)


def _keys(seqs: list[Sequence[int]], rows: list[int], vocab: int, what: str,
          device: torch.device) -> torch.Tensor:
    """Flat ``rows[j] * vocab + token`` index of every token of ``seqs[j]``: (N,) long.

    Raises ValueError when a token id is outside ``[0, vocab)``.
    """
    for seq in seqs:
        if len(seq) and (min(seq) < 0 or max(seq) >= vocab):
            raise ValueError(f"{what} token ids must be in [0, {vocab})")
    parts = [torch.as_tensor(seq, dtype=torch.long) + r * vocab
             for r, seq in zip(rows, seqs) if len(seq)]
    if not parts:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(parts).to(device)                                       # (N,)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: Sequence[TokenHistory | None] | None) -> torch.Tensor:
    """``logits`` (B, V) fp32 with each row's penalties and bias applied.

    Returns ``logits`` itself when no row has any (no copy); otherwise a new
    tensor, the input untouched. ``histories[i]`` may be None only for rows
    without penalties.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    if histories is None or len(histories) != len(params):
        raise ValueError("rows with penalties need one TokenHistory per logits row")
    hist = [histories[i] for i in rows]
    if any(h is None for h in hist):
        raise ValueError("a row with penalties has no TokenHistory")
    ps = [params[i] for i in rows]
    out = torch.clone(logits, memory_format=torch.contiguous_format)          # (B, V)
    flat = out.view(-1)                                                       # (B*V,)
    # Only entries of tokens in a history change: work on those, not on (R, V).
    out_keys = _keys([h.output for h in hist], rows, vocab, "output", device)  # (N_out,)
    if any(p.repetition_penalty != 1.0 for p in ps):
        prompts = [h.prompt if p.repetition_penalty != 1.0 else () for h, p in zip(hist, ps)]
        seen = torch.unique(torch.cat([out_keys, _keys(prompts, rows, vocab, "prompt", device)]))
        rep = _per_row([p.repetition_penalty for p in ps], rows, len(params), device)
        # a penalty that is a normal double may be 0 or inf in float32 (5e-324, 1e300):
        # keep it inside float32's normal range and the results finite, or the row's
        # softmax turns to NaN and the sampler fails the whole step
        fmax = torch.finfo(rep.dtype).max
        rep = rep.clamp(torch.finfo(rep.dtype).tiny, fmax)[seen // vocab]   # (S,)
        vals = flat[seen]                                                     # (S,)
        flat[seen] = torch.where(vals > 0, vals / rep, vals * rep).clamp(-fmax, fmax)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in ps):
        tokens, counts = torch.unique(out_keys, return_counts=True)           # (U,), (U,)
        row = tokens // vocab
        freq = _per_row([p.frequency_penalty for p in ps], rows, len(params), device)[row]
        pres = _per_row([p.presence_penalty for p in ps], rows, len(params), device)[row]
        flat[tokens] -= freq * counts + pres                                  # count > 0 here
    bias = [(r, tid, b) for r, p in zip(rows, ps) for tid, b in (p.logit_bias or ())]
    if bias:
        b_rows, b_ids, b_vals = zip(*bias)
        if max(b_ids) >= vocab:
            raise ValueError(f"logit_bias token ids must be < the vocabulary size {vocab}")
        out.index_put_((torch.tensor(b_rows, device=device), torch.tensor(b_ids, device=device)),
                       torch.tensor(b_vals, device=device), accumulate=True)
    return out
