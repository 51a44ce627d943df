"""Load adaptivity: per step, speculate or not, by the throughput each choice has measured at this batch size.

On a compute-bound device (this CPU) a verify step costs roughly in proportion to the tokens it processes, so a
draft shape that pays at batch 1 loses at batch 8. Instead of a cost model with constants to tune, the gate measures
what matters: for each batch-size bucket (running requests 1, 2-3, 4-7, 8-15, ...) an exponential moving average of
tokens emitted per request per second, separately for steps that verified drafts (arm "on") and steps that did not
("off"). Each step it picks the faster arm and now and then the other one, so a change in acceptance or load is
noticed: every `explore_every`-th decision of a bucket, or more rarely when the other arm is much slower, so that
exploring costs at most about `explore_budget` of the throughput. Output is unaffected either way: an "off" step is
a plain vanilla step.

Vocabulary: a *decision* is made when drafting for the next step; the *measurement* of that decision is the interval
from its drafting call to the next one (drafting + the verify/decode step) and the tokens that step emitted per
request. Every step is measured: prefill chunks and rows that cannot draft land in both arms alike.

Worked example (alpha 0.5, warmup 2): bucket 8-15 measures on: 1.6 tok/req in 0.20 s, 1.5 in 0.19 s -> EMA ~7.9
tok/req/s; off: 1.0 in 0.085 s, 1.0 in 0.083 s -> ~11.9: the gate says off; "on" is 1.5x slower, so it explores
every max(16, (1.5 - 1) / 0.03 = 17) = 17th decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ArmStats:
    rate: float = 0.0           # EMA of tokens per request per second
    samples: int = 0


@dataclass
class Bucket:
    on: ArmStats = field(default_factory=ArmStats)
    off: ArmStats = field(default_factory=ArmStats)
    decisions: int = 0


class SpeculationGate:
    def __init__(self, warmup: int = 4, explore_every: int = 16, explore_budget: float = 0.03, alpha: float = 0.2):
        self.warmup, self.explore_every, self.explore_budget, self.alpha = warmup, explore_every, explore_budget, alpha
        self.buckets: dict[int, Bucket] = {}

    @staticmethod
    def bucket_of(num_reqs: int) -> int:
        """1 -> 1, 2..3 -> 2, 4..7 -> 3, 8..15 -> 4, ..."""
        return max(1, num_reqs).bit_length()

    def record(self, num_reqs: int, speculated: bool, step_s: float, tokens_per_req: float) -> None:
        if step_s <= 0:
            return
        b = self.buckets.setdefault(self.bucket_of(num_reqs), Bucket())
        arm = b.on if speculated else b.off
        rate = tokens_per_req / step_s
        arm.rate = rate if arm.samples == 0 else arm.rate + self.alpha * (rate - arm.rate)
        arm.samples += 1

    def speculate(self, num_reqs: int) -> bool:
        b = self.buckets.setdefault(self.bucket_of(num_reqs), Bucket())
        b.decisions += 1
        if b.on.samples < self.warmup or b.off.samples < self.warmup:
            return b.on.samples <= b.off.samples          # measure both arms first, "on" first
        best = b.on.rate >= b.off.rate
        slow = max(b.on.rate, b.off.rate) / max(min(b.on.rate, b.off.rate), 1e-9)   # one exploring step's cost
        every = max(self.explore_every, math.ceil((slow - 1) / self.explore_budget))
        return best != (b.decisions % every == 0)

    def summary(self) -> dict:
        """{bucket's smallest batch size: (on rate, off rate, on samples, off samples)} for stats and benchmarks."""
        return {1 << (k - 1): (round(b.on.rate, 2), round(b.off.rate, 2), b.on.samples, b.off.samples)
                for k, b in sorted(self.buckets.items())}
