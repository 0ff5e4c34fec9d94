"""Speculation statistics (REFERENCE section 3), kept per request and per run.

A request-step is one request taking part in one decode step. drafted counts every
proposed token (unselected Tetris extras included), verified counts the drafts sent to the
target (sum of l_i), accepted the drafts kept before the first rejection.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_steps: int = 0  # engine decode steps (run level) or steps this request took part in
    request_steps: int = 0  # request-steps, speculative or not
    spec_request_steps: int = 0  # request-steps that drafted
    drafted: int = 0
    verified: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by decode steps (accepted drafts + 1 per request-step)
    oracle_accepted: int = 0  # accepted drafts in steps that ran the shadow oracle
    oracle_bound: int = 0  # sum over those steps of min(C, sum of true accepted lengths)
    verified_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, drafted: int, verified: int, accepted: int, emitted: int) -> None:
        """One request-step: `verified` drafts sent, the first `accepted` of them kept."""
        self.request_steps += 1
        self.spec_request_steps += drafted > 0
        self.drafted += drafted
        self.verified += verified
        self.accepted += accepted
        self.emitted += emitted
        grow = verified - len(self.verified_per_pos)
        if grow > 0:
            self.verified_per_pos.extend([0] * grow)
            self.accepted_per_pos.extend([0] * grow)
        for j in range(verified):
            self.verified_per_pos[j] += 1
            self.accepted_per_pos[j] += j < accepted

    def merge(self, other: SpecStats) -> None:
        for name in ("num_steps", "request_steps", "spec_request_steps", "drafted", "verified", "accepted",
                     "emitted", "oracle_accepted", "oracle_bound"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.verified_per_pos, other.verified_per_pos),
                             (self.accepted_per_pos, other.accepted_per_pos)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, v in enumerate(theirs):
                mine[j] += v

    def summary(self) -> dict:
        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "num_steps": self.num_steps,
            "request_steps": self.request_steps,
            "drafted_tokens": self.drafted,
            "verified_tokens": self.verified,
            "accepted_tokens": self.accepted,
            "emitted_tokens": self.emitted,
            "verification_success_rate": ratio(self.accepted, self.verified),
            "draft_acceptance_rate": ratio(self.accepted, self.drafted),
            "system_efficiency": ratio(self.emitted, self.verified + self.request_steps),
            "mean_accepted_length": ratio(self.accepted, self.spec_request_steps),
            "per_position_acceptance": [
                round(a / v, 4) if v else None for a, v in zip(self.accepted_per_pos, self.verified_per_pos)
            ],
            "oracle_efficiency": ratio(self.oracle_accepted, self.oracle_bound),
        }
