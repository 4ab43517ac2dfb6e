"""Statistics of `kvcache eval` over windows of text: pooled perplexity ratios, top-1 agreement, and their bootstrap
intervals.

Each window is one stretch of text scored by every method; its tokens are not independent of each other, its
windows are (they are disjoint stretches of the text), so the bootstrap resamples whole windows. Resampling is
paired: one draw of windows serves every method and dense, so a ratio's interval reflects how the method's loss
moves with dense's across texts, not the spread of either alone. Pure functions of per-window sums; no model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and the bounds of its bootstrap interval (the same units)."""

    point: float
    low: float
    high: float

    def bounds(self) -> list[float]:
        """[low, high], as the JSON writes them."""
        return [self.low, self.high]

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside the interval."""
        return value < self.low or value > self.high


def resample(windows: int, resamples: int = RESAMPLES, seed: int = SEED) -> torch.Tensor:
    """Window indices [resamples, windows] int64, each row a draw of `windows` windows with replacement."""
    if windows < 1:
        raise ValueError("the bootstrap needs at least one window")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(windows, (resamples, windows), generator=gen)


def pooled_interval(numerator: Sequence[float], denominator: Sequence[float], resamples: int = RESAMPLES,
                    seed: int = SEED, level: float = LEVEL) -> Interval:
    """sum(numerator) / sum(denominator) over the windows, and its percentile bootstrap interval at `level` (the
    windows resampled as `resample(len, resamples, seed)` draws them: the same seed, the same draws)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("numerator and denominator need one value per window, at least one window")
    # Exact sums (math.fsum): windows that agree give every draw the estimate itself, bit for bit, and a method equal
    # to dense a difference of exactly 0, whatever the order a draw sums them in.
    draws = torch.tensor([math.fsum(numerator[i] for i in row) / math.fsum(denominator[i] for i in row)
                          for row in resample(len(numerator), resamples, seed).tolist()], dtype=torch.float64)
    point = math.fsum(numerator) / math.fsum(denominator)
    tail = (1 - level) / 2
    low, high = (float(x) for x in torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=torch.float64)))
    # The percentile interval of a skewed statistic over few windows can leave out the estimate itself: widen it to
    # hold the estimate (never narrower than the percentile interval).
    return Interval(point, min(low, point), max(high, point))


def log_ratio(nll_method: Sequence[float], nll_base: Sequence[float], tokens: Sequence[int],
              resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """log(perplexity of the method / perplexity of the base) pooled over all scored tokens of all windows (nats per
    token), paired over windows: nll_* are each window's summed negative log-likelihood (nats), tokens its count."""
    diff = [a - b for a, b in zip(nll_method, nll_base, strict=True)]
    return pooled_interval(diff, [float(n) for n in tokens], resamples, seed, level)


def perplexity_ratio(nll_method: Sequence[float], nll_dense: Sequence[float], tokens: Sequence[int],
                     resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """exp(mean nll of the method) / exp(mean nll of dense) over all scored tokens of all windows, with its paired
    bootstrap interval (exp of log_ratio's: exp is monotone, so the percentiles carry over)."""
    r = log_ratio(nll_method, nll_dense, tokens, resamples, seed, level)
    return Interval(math.exp(r.point), math.exp(r.low), math.exp(r.high))


def agreement(matches: Sequence[int], tokens: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> Interval:
    """Share of all scored positions where the method's argmax is dense's (teacher-forced top-1 agreement), from
    each window's matches and scored positions, with its bootstrap interval."""
    return pooled_interval([float(m) for m in matches], [float(n) for n in tokens], resamples, seed, level)


def top1_matches(argmax_method: torch.Tensor, argmax_dense: torch.Tensor) -> int:
    """Positions where two teacher-forced runs of one window predict the same next token."""
    return int((argmax_method == argmax_dense).sum())


def window_ratios(nll_method: Sequence[float], nll_dense: Sequence[float], tokens: Sequence[int]) -> list[float]:
    """Each window's own perplexity ratio to dense, exp((nll_method - nll_dense) / tokens)."""
    return [math.exp((a - b) / n) for a, b, n in zip(nll_method, nll_dense, tokens, strict=True)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, smallest and largest of per-window values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def verdict(difference: Interval) -> str:
    """"better" if an interval of log(ppl_method / ppl_other) lies below 0, "worse" above 0, else "tie"."""
    if difference.high < 0:
        return "better"
    return "worse" if difference.low > 0 else "tie"
