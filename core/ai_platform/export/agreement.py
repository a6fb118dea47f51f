"""How far an exported graph's next-token distributions are from its fp32 source's: the maths and the threshold.

Numpy only (no torch): the exporter computes and judges the numbers, the server reads what was recorded.
At every position of the calibration text both models predict the next token; the measures are

* **top-1 agreement**: the share of positions where both put the same token first (what greedy decoding
  and option scoring act on), and
* **mean KL divergence** ``KL(P || Q) = sum_i p_i (ln p_i - ln q_i)`` in nats, of the export's distribution Q
  from the fp32 source's P, averaged over positions: how much probability moved, also where the first
  token stayed (sampling, the scores ``classify`` returns).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The calibration text must give at least this many positions, so one flipped near-tie moves top-1 by <0.4%.
MIN_POSITIONS = 256
# The default threshold, below which an export is warned about (or refused with --strict): where llama.cpp's
# 4-bit formats end and its 3-bit ones begin on its Llama 3 8B scoreboard (tools/perplexity/README.md, against
# fp16 on Wikitext: q4_K_M mean KL 0.031 with the same top token 92% of the time, q4_0 0.074, q3_K_M 0.10,
# q2_K 0.46 and 70%). Measured here (docs/benchmarks.md): SmolLM2-135M at int8 0.958 / 0.0056, at int4
# 0.530 / 0.50 (a small model loses much more); any fp32 export 1.000 / ~1e-11.
MIN_TOP1 = 0.90
MAX_MEAN_KL = 0.10
_BLOCK = 64  # positions per step of the float64 maths: bounded memory for 150k-token vocabularies


class ValidationFailed(RuntimeError):
    """The export does not compute what its source computes, or not closely enough: it is not published."""


@dataclass(frozen=True)
class Agreement:
    """An export's next-token distributions against the fp32 reference's, over ``positions`` positions."""

    positions: int
    top1: float  # share of positions with the same most likely token, 0..1
    mean_kl: float  # mean KL(reference || export), nats
    max_logit_diff: float  # largest absolute difference of one logit


@dataclass(frozen=True)
class Threshold:
    """What an export must reach: at least ``min_top1`` agreement and at most ``max_mean_kl``."""

    min_top1: float = MIN_TOP1
    max_mean_kl: float = MAX_MEAN_KL

    def shortfalls(self, agreement: Agreement) -> list[str]:
        """Each way ``agreement`` misses this threshold, in words; empty when it meets it."""
        misses = []
        if agreement.top1 < self.min_top1:
            misses.append(f"top-1 agreement {agreement.top1:.3f} < {self.min_top1:g}")
        if not agreement.mean_kl <= self.max_mean_kl:  # a NaN misses too
            misses.append(f"mean KL {agreement.mean_kl:.3g} > {self.max_mean_kl:g}")
        return misses


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, in float64 (stable: the row's maximum is subtracted first)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def measure(reference: np.ndarray, logits: np.ndarray) -> Agreement:
    """Compare ``logits`` with ``reference``, both [positions, vocab] (one row per position predicted)."""
    if reference.shape != logits.shape or reference.ndim != 2 or not len(reference):
        raise ValueError(f"logits of shapes {reference.shape} and {logits.shape}: need equal [positions, vocab]")
    same = 0
    kl = 0.0
    diff = 0.0
    for start in range(0, len(reference), _BLOCK):
        p_rows, q_rows = reference[start : start + _BLOCK], logits[start : start + _BLOCK]
        same += int((p_rows.argmax(axis=-1) == q_rows.argmax(axis=-1)).sum())
        log_p, log_q = log_softmax(p_rows), log_softmax(q_rows)
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        diff = max(diff, float(np.abs(p_rows.astype(np.float64) - q_rows).max()))
    return Agreement(
        positions=len(reference), top1=same / len(reference), mean_kl=kl / len(reference), max_logit_diff=diff
    )
