"""Which occluder positions a sweep evaluates: every one (exact), or an approximation that evaluates fewer and
says so.

A sweep's positions form an ``n x n`` grid (``n`` window starts per axis, :func:`~.results.window_starts`). A
:class:`Planner` hands out the positions to evaluate in rounds and is told the target's probability at each;
the engine batches a round's positions (across images, too) into full forward passes. Approximations:

- ``drilldown`` (adaptive drill-down over full forward passes): a coarse lattice, every ``coarse``-th position
  per axis (and the last, so the borders are covered); then the step halves until it is 1, and each time the
  positions one step away from the ``refine`` lowest probabilities so far (the largest drops) are evaluated.
  About ``n^2 / coarse^2 + 8 * refine * log2(coarse)`` positions.
- ``early-stop`` (stop when the evidence is decided): the same coarse lattice, then rounds: a position not yet
  evaluated is a candidate while some evaluated position within ``coarse`` steps of it shows a drop of the
  target's probability of at least ``1 - margin`` times the largest drop found so far (a window is assumed to
  drop at most ``1 / (1 - margin)`` times as much as its evaluated neighbours); the ``ROUND`` most promising
  candidates are evaluated, and the sweep stops when none is left: the position of the largest drop is then
  decided under that assumption. ``margin`` 0 refines only next to the largest drop found so far (a descent
  that stops where that drop is the largest of its neighbourhood); near 1 it evaluates nearly everything that
  drops at all.

Positions not evaluated get the inverse-distance mean of the evaluated ones within ``coarse`` steps (the
lattice guarantees some), so maps keep their shape and per-pixel attribution keeps Captum's definition over
filled values; the argmax class is the nearest evaluated position's. ``evaluated`` marks which are measured,
and the largest drop is only ever taken among those. Neither approximation is used with the incremental
engine (its stored per-layer outputs are never combined with drill-down): they run on full forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _checks as checks
from ..errors import InvalidArgumentError

APPROXIMATIONS = ("none", "drilldown", "early-stop")
# Defaults, chosen by the agreement gate's figures (README "Fast occlusion"): a lattice of every 2nd position
# quarters the forward passes; 3 refined neighbourhoods catch a largest drop that the lattice sees only
# second or third; early stopping refines wherever a neighbour drops at least half as much as the largest drop.
DEFAULT_COARSE = 2
DEFAULT_REFINE = 3
DEFAULT_MARGIN = 0.5
MAX_COARSE = 16
ROUND = 8            # early-stop candidates evaluated per round (a small batch is still efficient)


@dataclass(frozen=True)
class Approximation:
    """An approximation and its knobs; ``kind`` "none" evaluates every position."""

    kind: str = "none"
    coarse: int = DEFAULT_COARSE
    refine: int = DEFAULT_REFINE
    margin: float = DEFAULT_MARGIN

    def __post_init__(self):
        checks.choice(self.kind, "approximation", APPROXIMATIONS)
        checks.integer(self.coarse, "coarse", 1, MAX_COARSE, label="--coarse")
        checks.integer(self.refine, "refine", 0, 10_000, label="--refine")
        if not (isinstance(self.margin, (int, float)) and 0.0 <= float(self.margin) <= 1.0):
            raise InvalidArgumentError(f"--margin: {self.margin!r} out of range; accepted 0..1 (a share of the "
                                       f"largest drop)", field="margin")

    @property
    def exact(self) -> bool:
        return self.kind == "none"

    @property
    def name(self) -> str:
        """How results, rows and the gate name it, knobs included."""
        if self.kind == "drilldown":
            return f"drilldown(coarse {self.coarse}, refine {self.refine})"
        if self.kind == "early-stop":
            return f"early-stop(coarse {self.coarse}, margin {self.margin:g})"
        return "none"

    def planner(self, count: int, base: float) -> "Planner":
        """A planner for an ``count`` x ``count`` grid; ``base``: the target's unoccluded probability."""
        if self.kind == "drilldown":
            return DrillDown(count, self.coarse, self.refine)
        if self.kind == "early-stop":
            return EarlyStop(count, self.coarse, float(self.margin), base)
        return Planner(count)


EXACT = Approximation()


class Planner:
    """Every position, in one round (the exact sweep)."""

    def __init__(self, count: int):
        self.count = count
        self.values = np.full((count, count), np.nan)
        self.evaluated = np.zeros((count, count), dtype=bool)
        self.rounds = 0

    @property
    def radius(self) -> int:
        return 1

    def next(self) -> np.ndarray:
        """Flat (row-major) indices of the positions to evaluate next; empty when the sweep is done."""
        self.rounds += 1
        return np.flatnonzero(~self.evaluated) if self.rounds == 1 else np.empty(0, np.int64)

    def record(self, flat: np.ndarray, values: np.ndarray) -> None:
        self.values.flat[flat] = values
        self.evaluated.flat[flat] = True

    @property
    def done(self) -> int:
        """Positions decided so far (evaluated, or skipped once the plan has ended)."""
        return int(self.evaluated.sum())

    def filled(self) -> tuple[np.ndarray, np.ndarray]:
        """(values with the unevaluated positions filled, for each position the flat index of its nearest
        evaluated one)."""
        if self.evaluated.all():
            return self.values.copy(), np.arange(self.count ** 2).reshape(self.count, self.count)
        return _fill(self.values, self.evaluated, self.radius)

    def _lattice(self, coarse: int) -> np.ndarray:
        axis = np.unique(np.r_[np.arange(0, self.count, coarse), self.count - 1])
        return (axis[:, None] * self.count + axis[None, :]).reshape(-1)


class _Coarse(Planner):
    """The approximations' first round: the lattice of every ``coarse``-th position (and the last) per axis."""

    def __init__(self, count: int, coarse: int):
        super().__init__(count)
        self.coarse = coarse

    @property
    def radius(self) -> int:
        return self.coarse

    def next(self) -> np.ndarray:
        self.rounds += 1
        if self.rounds == 1:
            return self._lattice(self.coarse)
        return self._refine()

    def _refine(self) -> np.ndarray:
        raise NotImplementedError


class DrillDown(_Coarse):
    def __init__(self, count: int, coarse: int, refine: int):
        super().__init__(count, coarse)
        self.refine = refine
        self.step = coarse

    def _refine(self) -> np.ndarray:
        """Halve the step until 1: around each of the ``refine`` lowest probabilities so far, the positions one
        new step away (the 3 x 3 block at that step)."""
        while self.step > 1 and self.refine > 0:
            self.step //= 2
            evaluated = np.flatnonzero(self.evaluated)
            lowest = evaluated[np.argsort(self.values.flat[evaluated], kind="stable")[:self.refine]]
            near = np.zeros_like(self.evaluated)
            for flat in lowest:
                r, c = divmod(int(flat), self.count)
                rows = np.clip(r + self.step * np.arange(-1, 2), 0, self.count - 1)
                cols = np.clip(c + self.step * np.arange(-1, 2), 0, self.count - 1)
                near[np.ix_(rows, cols)] = True
            todo = np.flatnonzero(near & ~self.evaluated)
            if len(todo):
                return todo
        return np.empty(0, np.int64)


class EarlyStop(_Coarse):
    def __init__(self, count: int, coarse: int, margin: float, base: float):
        super().__init__(count, coarse)
        self.margin, self.base = margin, base

    def _refine(self) -> np.ndarray:
        largest = self.base - np.nanmin(self.values)
        near_min = _neighbourhood_min(np.where(self.evaluated, self.values, np.inf), self.coarse)
        candidate = ~self.evaluated & (self.base - near_min >= (1.0 - self.margin) * largest) & (largest > 0)
        flat = np.flatnonzero(candidate)
        return flat[np.argsort(near_min.flat[flat], kind="stable")[:ROUND]]


# ---------------------------------------------------------------------------------------------- filling
def _offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) within ``radius`` (Chebyshev), nearest first (Euclidean, then row-major)."""
    pairs = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return sorted(pairs, key=lambda p: (p[0] ** 2 + p[1] ** 2, p))


def _shifted(a: np.ndarray, dy: int, dx: int, pad) -> np.ndarray:
    """``out[i, j] = a[i + dy, j + dx]``, ``pad`` outside."""
    n, m = a.shape
    out = np.full_like(a, pad)
    if abs(dy) >= n or abs(dx) >= m:
        return out
    out[max(0, -dy):n - max(0, dy), max(0, -dx):m - max(0, dx)] = \
        a[max(0, dy):n - max(0, -dy), max(0, dx):m - max(0, -dx)]
    return out


def _neighbourhood_min(a: np.ndarray, radius: int) -> np.ndarray:
    out = np.full_like(a, np.inf)
    for dy, dx in _offsets(radius):
        np.minimum(out, _shifted(a, dy, dx, np.inf), out=out)
    return out


def _fill(values: np.ndarray, evaluated: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    n = values.shape[0]
    flat = np.arange(n * n).reshape(n, n)
    total, weight = np.zeros_like(values), np.zeros_like(values)
    nearest = np.where(evaluated, flat, -1)
    known = np.where(evaluated, values, 0.0)
    for dy, dx in _offsets(radius):
        if dy == dx == 0:
            continue
        there = _shifted(evaluated, dy, dx, False)
        w = there / np.hypot(dy, dx)
        total += w * _shifted(known, dy, dx, 0.0)
        weight += w
        nearest = np.where((nearest < 0) & there, _shifted(flat, dy, dx, -1), nearest)
    if (weight[~evaluated] == 0).any():    # cannot happen with a lattice of step <= radius; a plain guard
        raise AssertionError("an unevaluated position has no evaluated neighbour")
    filled = np.where(evaluated, values, total / np.maximum(weight, 1e-300))
    return filled, nearest


__all__ = ["APPROXIMATIONS", "Approximation", "DEFAULT_COARSE", "DEFAULT_MARGIN", "DEFAULT_REFINE", "EXACT",
           "Planner"]
