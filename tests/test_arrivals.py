"""The admission hold rule (hippod.engine.arrivals), on a hand-driven clock: the runner waits
for exactly the requests the daemon numbered before sending the ones it has, never for a lone
request, and never longer than its hold."""

from __future__ import annotations

import pytest

from hippod.engine.arrivals import Arrivals


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lone_request_never_waits():
    a = Arrivals(hold=0.025, clock=Clock())
    a.came(1, 1)
    assert a.wait() == 0 and a.waits == 0
    a.came(2, 2)  # the next one, later, alone again
    assert a.wait() == 0 and a.waits == 0


def test_it_waits_for_exactly_the_numbered_ones_in_any_order():
    clock = Clock()
    a = Arrivals(hold=0.025, clock=clock)
    a.came(1, 5)  # sent when the daemon had numbered 5
    assert a.missing == 4 and a.wait() == pytest.approx(0.025)
    for number, told in ((4, 8), (2, 6), (3, 8), (5, 8), (7, 8), (6, 8)):
        clock.now += 0.001
        a.came(number, told)
        assert a.wait() > 0, number
    a.came(8, 8)
    assert a.missing == 0 and a.wait() == 0
    assert (a.waits, a.given_up) == (1, 0)
    a.came(9, 9)  # after the burst: a lone request starts at once
    assert a.wait() == 0 and a.waits == 1


def test_a_request_that_never_comes_costs_only_the_hold():
    clock = Clock()
    a = Arrivals(hold=0.025, clock=clock)
    a.came(1, 3)
    a.came(3, 3)  # number 2 died in the daemon (its client went away)
    assert a.wait() == pytest.approx(0.025)
    clock.now += 0.024
    assert 0 < a.wait() < 0.002
    clock.now += 0.002
    assert a.wait() == 0 and a.given_up == 1
    a.came(2, 3)  # came after all: nothing is waited for on its account
    a.came(4, 4)
    assert a.missing == 0 and a.wait() == 0


def test_unnumbered_requests_never_wait():
    a = Arrivals(clock=Clock())
    a.came(0, 0)
    assert a.missing == 0 and a.wait() == 0


def test_a_burst_that_keeps_coming_renews_the_hold_up_to_its_cap():
    """The daemon takes longer than one hold to send 32: each arrival waits on for the next,
    never past max_hold from the start of the wait."""
    clock = Clock()
    a = Arrivals(hold=0.025, clock=clock, max_hold=0.1)
    a.came(1, 32)
    assert a.wait() == pytest.approx(0.025)
    for number in range(2, 5):  # one every 20 ms: each renews the hold
        clock.now += 0.02
        a.came(number, 32)
        assert a.wait() == pytest.approx(0.025), number
    clock.now += 0.02  # 80 ms in; the next arrival's hold is cut to the cap
    a.came(5, 32)
    assert a.wait() == pytest.approx(0.02)
    clock.now += 0.021
    assert a.wait() == 0 and a.given_up == 27
    a.came(5, 32)  # a number seen twice changes nothing
    assert a.wait() == 0 and a.waits == 1
