"""Load adaptivity: per step, speculate or not, by the throughput each choice has measured at this batch size.

On a compute-bound device (a CPU) a verify step costs roughly in proportion to the tokens it processes, so a
draft shape that pays at batch 1 can lose at batch 8. Instead of a cost model with constants to tune, the gate measures
what matters: for each bucket — batch size (running requests 1, 2-3, 4-7, 8-15, ...) and whether any running request
samples (T > 0 accepts fewer drafts than greedy, so the two must not share estimates) — the tokens emitted per request
per second, separately for steps that verified drafts (arm "on") and steps that did not ("off"). Each step it picks the
faster arm and now and then the other one, so a change in acceptance or load is noticed: every `explore_every`-th
decision of a bucket, or more rarely when exploring costs more, so that it costs at most about `explore_budget` of
the throughput (but at least every `explore_max`-th decision). Output is unaffected either way: an "off" step is a
plain vanilla step.

An arm's rate is (mean tokens per request per step) / (mean seconds per step), two moving averages: seconds follow load
quickly (`alpha`), tokens slowly (`alpha_tokens`), because one step's accepted length is noisy — many "on" steps emit a
single token even where drafting pays — while acceptance itself drifts slowly. (Not an average of per-step rates, the
first version: its "on" estimate swings widely step to step, and once an unlucky run drops it below "off" it is
refreshed only on exploration steps, so the gate can keep a real win off for most steps.) Each average starts as the
plain mean of its first 1/alpha samples; later, a step under half the average replaces the seconds average (nothing
makes a step twice as fast, but a stall or a batch of prefills in a rarely explored arm's average would otherwise take
dozens of explorations to decay). Until the slower arm has `settle` samples it is explored every 4th decision — unless
the arms are clearly apart (one `apart` times faster) once each has `early` samples: then warm-up and settling end at
once. Learning is not free: where a drafted step costs several plain ones (a tree under load), the full warm-up + settle
(20 drafted steps) costs a short batch much of its speed; clearly apart, it costs `early` (3) drafted steps.
`alpha_tokens` is as slow as it is so that the noisy batch-1 case of tests/test_adapt.py
(test_gate_keeps_a_small_win_despite_noisy_acceptance) keeps speculating on over 90 % of its steps, about the most
exploring allows. The measurements behind these choices: docs/notes.md, "vllm_eagle/adapt.py".

Vocabulary: a *decision* is made when drafting for the next step; the *measurement* of that decision is the interval
from its drafting call to the next one (drafting + the verify/decode step) and the tokens that step emitted per
request, if that step ran some of the requests the decision was made for and no others (`comparable`): a request
joining in between brings its prefill into the interval. Prefill chunks of requests already running and rows that
cannot draft land in both arms alike.

Worked example: bucket 8-15 has measured on: 1.5 tokens per request in 0.20 s per step -> 7.5 tok/req/s; off: 1.0 in
0.085 s -> 11.8: the gate says off; "on" is 1.57x slower. One "on" step takes 0.20 / 0.085 = 2.35 "off" steps and
emits what 1.5 of them would, so exploring costs 2.35 * (1 - 1 / 1.57) = 0.85 "off" steps, and it explores every
max(16, 0.85 / 0.03 = 29) = 29th decision. (A step that takes 5 plain steps for 1.85 tokens: cost 3.15, every
105th; counting (slow - 1) = 1.7 instead, as the gate first did, explores every 57th and loses 3.15 / 57 = 5.5 %.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ArmStats:
    tokens: float = 0.0         # moving average of tokens emitted per request per step
    seconds: float = 0.0        # moving average of seconds per step
    samples: int = 0

    @property
    def rate(self) -> float:
        """tokens per request per second"""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, seconds: float, tokens: float, alpha: float, alpha_tokens: float) -> None:
        self.samples += 1
        if self.samples > 1 / alpha and seconds < self.seconds / 2:
            self.seconds = seconds      # a surprise: the average held a stall or prefill (nothing halves a step)
        else:
            self.seconds += max(alpha, 1 / self.samples) * (seconds - self.seconds)
        self.tokens += max(alpha_tokens, 1 / self.samples) * (tokens - self.tokens)


@dataclass
class Bucket:
    on: ArmStats = field(default_factory=ArmStats)
    off: ArmStats = field(default_factory=ArmStats)
    decisions: int = 0


class SpeculationGate:
    def __init__(self, warmup: int = 8, explore_every: int = 16, explore_budget: float = 0.03, alpha: float = 0.2,
                 alpha_tokens: float = 0.02, settle: int = 20, explore_max: int = 256, early: int = 3,
                 apart: float = 1.5):
        self.warmup, self.explore_every, self.explore_budget = warmup, explore_every, explore_budget
        self.explore_max, self.early, self.apart = explore_max, early, apart
        self.alpha, self.alpha_tokens, self.settle = alpha, alpha_tokens, settle
        self.buckets: dict[tuple[int, bool], Bucket] = {}   # (bucket_of(num_reqs), any request samples) -> arms

    @staticmethod
    def bucket_of(num_reqs: int) -> int:
        """1 -> 1, 2..3 -> 2, 4..7 -> 3, 8..15 -> 4, ..."""
        return max(1, num_reqs).bit_length()

    @staticmethod
    def comparable(decided: frozenset, now: list) -> bool:
        """Whether the step after a decision measures it: the requests running now are some of those it was made for.
        A request that joined in between brought its prefill into the interval (one such sample can wreck a
        bucket's estimate); one that went idle in between has no step at all; finished requests only leave."""
        return bool(now) and decided.issuperset(now)

    def record(self, num_reqs: int, speculated: bool, step_s: float, tokens_per_req: float,
               sampled: bool = False) -> None:
        if step_s <= 0:
            return
        b = self.buckets.setdefault((self.bucket_of(num_reqs), sampled), Bucket())
        (b.on if speculated else b.off).add(step_s, tokens_per_req, self.alpha, self.alpha_tokens)

    def speculate(self, num_reqs: int, sampled: bool = False) -> bool:
        b = self.buckets.setdefault((self.bucket_of(num_reqs), sampled), Bucket())
        b.decisions += 1
        fewest = min(b.on.samples, b.off.samples)
        slow = max(b.on.rate, b.off.rate) / max(min(b.on.rate, b.off.rate), 1e-9)   # one exploring step's cost
        # Clearly apart: at batch 1 "off" cannot look 1.5x faster by chance (an "on" step emits >= 1 token and
        # costs more than an "off" one only by the drafting), and at batch 8+ a step averages over the requests.
        clear = fewest >= self.early and slow >= self.apart
        if fewest < self.warmup and not clear:
            return b.on.samples <= b.off.samples          # measure both arms first, "on" first
        best = b.on.rate >= b.off.rate
        other = b.off if best else b.on
        if other.samples < self.settle and not clear:     # its estimate still rests on a few noisy steps
            return best != (b.decisions % 4 == 0)
        # One exploring step costs the tokens the best arm would have emitted in its time, in best-arm steps:
        # (other's seconds / best's seconds) * (1 - 1 / slow). Never rarer than every explore_max-th: an arm whose
        # estimate went wrong must still be re-measured (one sample suffices, see ArmStats.add).
        chosen = b.on if best else b.off
        cost = other.seconds / max(chosen.seconds, 1e-9) * (1 - 1 / slow)
        every = min(self.explore_max, max(self.explore_every, math.ceil(cost / self.explore_budget)))
        return best != (b.decisions % every == 0)

    def summary(self) -> dict:
        """{"<bucket's smallest batch size>" (+ " sampled"): (on rate, off rate, on samples, off samples)}, e.g.
        {"1": (40.1, 36.0, 180, 31), "8 sampled": ...}, for stats and benchmarks."""
        return {f"{1 << (k - 1)}{' sampled' if sampled else ''}":
                (round(b.on.rate, 2), round(b.off.rate, 2), b.on.samples, b.off.samples)
                for (k, sampled), b in sorted(self.buckets.items())}
