"""How many tokens to draft each round, from measured costs.

A plain step takes `t_plain`; a round of k drafts takes t(k): the drafts, the round trip to the
peer that makes them, the verify of k + 1 tokens. Each draft is kept with probability alpha
(measured), so a round of k yields (1 - alpha^(k+1)) / (1 - alpha) tokens on average. The
policy drafts the k with the most tokens per second when that beats plain decoding by `margin`;
otherwise it steps plainly and probes with one drafting round now and then, twice as far apart
after each probe that found drafting losing (a probe whose own round paid is followed by another
at once: the decayed acceptance lags a text that became predictable). Acceptance changes with the text; a runner's costs
hardly do, so one policy serves all of a runner's streams and a request starts knowing what the
ones before it measured. Output never depends on the policy, only speed does.

t(k) is a line a + b*k fitted to the rounds measured; with one k measured it is the line from
(0, t_plain) to that point, which is optimistic for fewer drafts, so a losing k tries a smaller
one before drafting is given up.
"""

from __future__ import annotations

PROBE_ALPHA = 0.9  # a probe drafts as many as would pay best were this share of drafts kept


def ema(old: float | None, new: float, weight: float) -> float:
    """A moving average that starts at its first sample: measured costs drift slowly."""
    return new if old is None else (1 - weight) * old + weight * new


class DraftPolicy:
    """Asked once a round (`__call__` -> drafts to ask for, 0: a plain round), told what the
    round did (`record`); `begin` marks a new stream."""

    def __init__(self, num_draft: int, *, always: bool = False, margin: float = 1.05, weight: float = 0.3,
                 decay: float = 0.8, probe_first: int = 8, probe_most: int = 1024, refresh_every: int = 64):
        self.num_draft, self.always = num_draft, always
        self.margin, self.weight, self.decay = margin, weight, decay
        self.probe_first, self.probe_most, self.refresh_every = probe_first, probe_most, refresh_every
        self.t_plain: float | None = None  # seconds of a plain round
        self.plain_samples = 0
        self.t_round: dict[int, float] = {}  # drafts asked -> seconds of such a round
        self.round_samples = 0
        self.kept, self.tried = 0.0, 0.0  # drafts kept / drafts that were checked (decayed)
        self.gap = probe_first  # plain rounds between probes while drafting loses
        self.wait = probe_first
        self.probes = 0
        self.probing = False
        self.round = 0  # of the current stream
        self.drafted_in_stream = 0
        self.asked = 0

    def begin(self) -> None:
        self.round = self.drafted_in_stream = 0

    # -- the model ---------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        """Chance a draft is kept, given the one before it was."""
        return min(self.kept / self.tried, 0.99) if self.tried else 0.5

    def tokens(self, k: int, alpha: float | None = None) -> float:
        """Tokens a round of k drafts yields on average (the kept drafts and the target's own)."""
        a = self.alpha if alpha is None else alpha
        return (1 - a ** (k + 1)) / (1 - a)

    def seconds(self, k: int) -> float | None:
        """Predicted seconds of a round of k drafts, from the line through what was measured."""
        if k == 0:
            return self.t_plain
        points = sorted(self.t_round.items())
        if not points:
            return None
        if len(points) == 1:
            (k1, t1), = points
            base = self.t_plain or 0.0
            return base + max(t1 - base, 0.0) / k1 * k
        n = len(points)
        mk = sum(p[0] for p in points) / n
        mt = sum(p[1] for p in points) / n
        slope = sum((p[0] - mk) * (p[1] - mt) for p in points) / sum((p[0] - mk) ** 2 for p in points)
        slope = max(slope, 0.0)
        return max(mt + slope * (k - mk), 1e-9)

    def rate(self, k: int, alpha: float | None = None) -> float | None:
        """Predicted tokens per second with k drafts a round."""
        t = self.seconds(k)
        return None if t is None else self.tokens(k, alpha) / t

    def best(self, alpha: float | None = None) -> tuple[int, float]:
        """The number of drafts (1..num_draft) with the most tokens per second, and that rate."""
        rates = [(self.rate(k, alpha) or 0.0, -k) for k in range(1, self.num_draft + 1)]
        rate, k = max(rates)
        return -k, rate

    def token_seconds(self) -> float | None:
        """Seconds per token while drafting the best k; None until a drafting round was timed."""
        if not self.t_round:
            return None
        rate = self.best()[1]
        return 1 / rate if rate > 0 else None

    @property
    def known(self) -> bool:
        return self.plain_samples >= 2 and self.round_samples >= 2

    def pays(self) -> bool:
        return self.known and self.best()[1] > self.margin * self.rate(0)

    # -- each round --------------------------------------------------------------------------

    def __call__(self) -> int:
        self.round += 1
        n = self._choose()
        self.asked = n
        return n

    def _choose(self) -> int:
        if self.num_draft < 1 or self.always:
            return self.num_draft
        if not self.known:  # learn: a drafting round first (the draft's warm-up), then alternate
            return 0 if self.round % 2 == 0 else self.num_draft
        if self.pays():
            return 0 if self.round % self.refresh_every == 0 else self.best()[0]  # keep t_plain fresh
        self.wait -= 1
        if self.wait > 0:
            return 0
        self.probes += 1
        self.probing = True
        return self.best(max(self.alpha, PROBE_ALPHA))[0]  # the k worth drafting if the text got predictable

    def record(self, drafted: int, accepted: int, seconds: float) -> None:
        if drafted == 0:
            # the stream's first round carries its warm-up; a round that asked for drafts and
            # got none (a lost peer) is no plain round
            if self.round > 1 and self.asked == 0:
                self.t_plain = self._ema(self.t_plain, seconds)
                self.plain_samples += 1
            return
        self.kept = self.decay * self.kept + accepted
        self.tried = self.decay * self.tried + accepted + (accepted < drafted)
        self.drafted_in_stream += 1
        if self.drafted_in_stream > 1:  # the first one carries the draft's warm-up (its connection, the context)
            self.t_round[drafted] = self._ema(self.t_round.get(drafted), seconds)
            self.round_samples += 1
        probe, self.probing = self.probing, False
        if self.pays():
            self.gap = self.wait = self.probe_first
        elif probe and (accepted + 1) / seconds > self.margin * self.rate(0):
            self.wait = 1  # this round paid: look again at once (the decayed acceptance lags)
        elif probe:
            self.gap = self.wait = min(self.gap * 2, self.probe_most)

    def _ema(self, old: float | None, new: float) -> float:
        return ema(old, new, self.weight)

    @property
    def on(self) -> bool:
        return not self.known or self.pays()

    def as_dict(self) -> dict:
        k, rate = self.best() if self.known else (self.num_draft, None)
        return {"t_plain": self.t_plain, "t_round": dict(sorted(self.t_round.items())), "alpha": self.alpha,
                "best_drafts": k, "best_rate": rate, "plain_rate": self.rate(0), "on": self.on,
                "probes": self.probes, "probe_gap": self.gap}
