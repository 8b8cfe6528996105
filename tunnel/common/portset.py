"""Sets of TCP ports written as single ports and ``"a-b"`` ranges.

Relays hand out thousands of ports; storing ranges rather than expanded sets keeps the
config cheap to hold and easy to print back to the user in its own notation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["MAX_PORT", "MIN_PORT", "PortSet"]

MIN_PORT = 1
MAX_PORT = 65535


class PortSet:
    """An immutable set of ports kept as sorted, merged, inclusive ranges."""

    __slots__ = ("_ranges",)

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if lo > hi:
                raise ValueError(f"empty range {lo}-{hi}")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self._ranges: tuple[tuple[int, int], ...] = tuple(merged)

    @classmethod
    def of(cls, *ports: int) -> PortSet:
        return cls((p, p) for p in ports)

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return self._ranges

    def __contains__(self, port: object) -> bool:
        if not isinstance(port, int) or isinstance(port, bool):
            return False
        return any(lo <= port <= hi for lo, hi in self._ranges)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self._ranges:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortSet) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(self._ranges)

    def __repr__(self) -> str:
        return f"PortSet({self.describe()!r})"

    def issubset(self, other: PortSet) -> bool:
        return all(any(olo <= lo and hi <= ohi for olo, ohi in other._ranges)
                   for lo, hi in self._ranges)

    def intersection(self, other: PortSet) -> PortSet:
        out: list[tuple[int, int]] = []
        for lo, hi in self._ranges:
            for olo, ohi in other._ranges:
                a, b = max(lo, olo), min(hi, ohi)
                if a <= b:
                    out.append((a, b))
        return PortSet(out)

    def difference(self, other: PortSet) -> PortSet:
        out: list[tuple[int, int]] = []
        for lo, hi in self._ranges:
            pieces = [(lo, hi)]
            for olo, ohi in other._ranges:
                nxt: list[tuple[int, int]] = []
                for a, b in pieces:
                    if ohi < a or olo > b:
                        nxt.append((a, b))
                        continue
                    if a < olo:
                        nxt.append((a, olo - 1))
                    if ohi < b:
                        nxt.append((ohi + 1, b))
                pieces = nxt
            out.extend(pieces)
        return PortSet(out)

    def overlaps(self, other: PortSet) -> bool:
        return bool(self.intersection(other))

    def describe(self) -> str:
        """The set in config notation, e.g. ``"6000-6009, 7000"``."""
        return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self._ranges)
