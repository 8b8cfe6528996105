"""PortSet against Python's own sets: every operation, on random sparse and dense sets.

The merge-walk algorithms replaced range-against-range loops (quadratic in the number of
ranges; see the class docstring), so these properties guard the rewrite. The speed itself is
measured by L-3's relay CPU, never asserted here (timings stay out of pass/fail tests).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.common.proto.portset import PortSet

#: A small port space makes overlaps, adjacency and gaps frequent.
SPACE = 200
ranges = st.lists(
    st.tuples(st.integers(1, SPACE), st.integers(0, 12)).map(lambda p: (p[0], p[0] + p[1])),
    max_size=12,
)


def as_set(portset: PortSet) -> set[int]:
    return set(portset)


@settings(max_examples=400, deadline=None)
@given(ranges, ranges)
def test_operations_match_python_sets(a_ranges: list[tuple[int, int]],
                                      b_ranges: list[tuple[int, int]]) -> None:
    a, b = PortSet(a_ranges), PortSet(b_ranges)
    sa, sb = as_set(a), as_set(b)
    assert as_set(a.intersection(b)) == sa & sb
    assert as_set(a.difference(b)) == sa - sb
    assert a.issubset(b) == (sa <= sb)
    assert a.overlaps(b) == bool(sa & sb)
    assert len(a) == len(sa)
    for port in range(0, SPACE + 15):
        assert (port in a) == (port in sa)


@settings(max_examples=200, deadline=None)
@given(ranges, ranges)
def test_results_are_canonical(a_ranges: list[tuple[int, int]],
                               b_ranges: list[tuple[int, int]]) -> None:
    """Results stay sorted, disjoint and merged, so equal sets compare and hash equal."""
    a, b = PortSet(a_ranges), PortSet(b_ranges)
    for result in (a.intersection(b), a.difference(b)):
        pairs = result.ranges
        assert all(lo <= hi for lo, hi in pairs)
        assert all(prev_hi + 1 < lo for (_, prev_hi), (lo, _) in itertools.pairwise(pairs))
        assert result == PortSet.of(*result)


def test_membership_rejects_non_ports() -> None:
    ports = PortSet([(1, 10)])
    assert True not in ports
    assert "5" not in ports
    assert 5 in ports and 11 not in ports and 0 not in ports


def test_sparse_relay_sized_sets() -> None:
    """400 single ports against 400 single ports and a shifted copy (L-3's shape)."""
    relay = PortSet.of(*range(20_000, 20_800, 2))
    client = PortSet.of(*range(20_000, 20_800, 2))
    shifted = PortSet.of(*range(20_001, 20_801, 2))
    assert len(client.intersection(relay)) == 400 and client.issubset(relay)
    assert not client.difference(relay) and not client.intersection(shifted)
    assert client.difference(shifted) == client and not client.issubset(shifted)
    assert all(port in relay for port in client) and all(p not in relay for p in shifted)
