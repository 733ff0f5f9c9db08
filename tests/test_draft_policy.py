"""The drafting policy's decisions, fed measured costs by hand (no model, no clock): it learns
what plain steps and drafting rounds cost, drafts the number that pays best, stops where nothing
pays, probes further apart each time drafting still loses, and carries what it knows from one
stream to the next."""

from __future__ import annotations

import pytest

from hippod.engine.draft_policy import DraftPolicy


def run(policy: DraftPolicy, rounds: int, t_plain: float, t_round, kept) -> list[int]:
    """Drive one stream: plain rounds take t_plain, a round of k drafts t_round(k) and keeps
    kept(k) of them. Returns the drafts asked each round."""
    policy.begin()
    asked = []
    for _ in range(rounds):
        k = policy()
        asked.append(k)
        policy.record(k, kept(k) if k else 0, t_round(k) if k else t_plain)
    return asked


# A peer 3 ms away on a box where a draft step costs as much as a target step: never pays.
def losing(k):
    return 0.045 + 0.032 * k


def half_kept(k):
    return k // 2


def test_it_learns_with_few_drafting_rounds_then_stops_and_probes_ever_further_apart():
    policy = DraftPolicy(3)
    asked = run(policy, 256, 0.033, losing, half_kept)
    assert asked[:5] == [3, 0, 3, 0, 3]  # a warm-up round, then plain and drafting alternate
    drafting = [i for i, k in enumerate(asked) if k]
    assert len(drafting) <= 10, drafting  # 3 to learn, one more k tried, then single probes
    probes = [i for i in drafting if i > 8]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 4 * gaps[0], gaps
    assert not policy.on


def test_a_second_stream_starts_off_where_drafting_lost_and_keeps_backing_off():
    policy = DraftPolicy(3)
    run(policy, 128, 0.033, losing, half_kept)
    gap = policy.gap
    asked = run(policy, 128, 0.033, losing, half_kept)
    assert asked[:16] == [0] * 16  # no learning again
    assert sum(1 for k in asked if k) <= 1
    assert policy.gap >= gap


def test_it_stays_on_and_picks_the_number_of_drafts_that_pays_best():
    # A Thunderbolt peer: 10 ms target steps, verifying a few more tokens is nearly free,
    # 0.2 ms of round trip, 1 ms a draft; acceptance 0.8 per draft (4 of 5 kept).
    policy = DraftPolicy(5)

    def kept(k):
        return min(k, 4)

    asked = run(policy, 200, 0.010, lambda k: 0.0102 + 0.001 * k + 0.0002 * k, kept)
    assert policy.on and policy.known
    assert sum(1 for k in asked if k) > 180
    k, rate = policy.best()
    assert rate > 1.5 * policy.rate(0)
    assert k == max(range(1, 6), key=policy.rate)


def test_the_best_number_of_drafts_follows_the_cost_of_a_round_trip():
    def best_after(fixed: float, per_draft: float) -> int:
        policy = DraftPolicy(6)
        for k in (2, 6):  # measured rounds at two sizes give the line
            for _ in range(3):
                policy.t_round[k] = fixed + per_draft * k
        policy.t_plain, policy.plain_samples, policy.round_samples = 0.010, 2, 2
        policy.kept, policy.tried = 8.0, 10.0  # alpha 0.8
        return policy.best()[0]

    near, far = best_after(0.0105, 0.002), best_after(0.040, 0.002)
    assert near < far  # a long round trip is worth more drafts per round
    assert best_after(0.0105, 0.008) == 1  # dear drafts: as few as possible


def test_one_measured_size_is_read_optimistically_for_fewer_drafts():
    policy = DraftPolicy(4)
    policy.t_plain, policy.t_round = 0.030, {4: 0.150}
    assert policy.seconds(1) == pytest.approx(0.060)  # no fixed cost assumed: smaller k is tried
    policy.t_round[1] = 0.080
    assert policy.seconds(1) == pytest.approx(0.080, rel=0.01)


def test_a_probe_that_finds_drafting_paying_turns_it_back_on():
    # Drafting costs what it did; at half the drafts kept it loses, with all of them it pays.
    def cost(k):
        return 0.040 + 0.008 * k

    policy = DraftPolicy(3)
    run(policy, 100, 0.033, cost, half_kept)
    assert not policy.on
    asked = run(policy, 300, 0.033, cost, lambda k: k)  # a text the draft predicts
    assert policy.on
    assert sum(1 for k in asked[-100:] if k) > 90
    assert policy.gap == policy.probe_first


def test_a_round_whose_drafts_never_came_is_not_a_plain_sample():
    policy = DraftPolicy(3)
    policy.begin()
    policy()
    policy.record(0, 0, 0.001)
    policy()  # a plain round, 30 ms
    policy.record(0, 0, 0.030)
    policy()  # asked for 3; the peer was lost and the round took its 1 s timeout
    policy.record(0, 0, 1.0)
    assert policy.t_plain == pytest.approx(0.030) and policy.plain_samples == 1
