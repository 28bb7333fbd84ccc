"""Shared benchmark plumbing.

- ``gpu``-marked benchmarks are skipped, with a reason, on hosts without CUDA.
- ``bench_record(group, role, benchmark, baseline=False)`` stores a benchmark's median under a group; at the
  end of the run every group's baseline median is divided by each other role's median and printed as a
  speedup (baseline / ours), so each pair's ratio sits on one line.
- ``bench_note(line)`` adds a line to that end-of-run section (ceilings, profiles, machine notes).
- ``bench_results()`` returns what was recorded so far: {group: {role: median seconds}}.
"""

from __future__ import annotations

import os

import pytest
import torch

_MEDIANS: dict[str, dict[str, float]] = {}
_BASELINES: dict[str, str] = {}
_NOTES: list[str] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def bench_record():
    def record(group: str, role: str, benchmark, baseline: bool = False) -> float | None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return None
        median = float(stats.stats.median)
        _MEDIANS.setdefault(group, {})[role] = median
        if baseline:
            _BASELINES[group] = role
        benchmark.extra_info["median_s"] = median
        return median
    return record


@pytest.fixture
def bench_note():
    return _NOTES.append


@pytest.fixture
def bench_results():
    return lambda: {group: dict(roles) for group, roles in _MEDIANS.items()}


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS and not _NOTES:
        return
    tr = terminalreporter
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tr.section(f"speedups: baseline median / ours median ({cores} usable cores, load average "
               f"{os.getloadavg()[0]:.1f})")
    for group in sorted(_MEDIANS):
        roles = _MEDIANS[group]
        base = _BASELINES.get(group)
        if base is None or base not in roles:
            tr.write_line(f"{group}: " + ", ".join(f"{r} {m * 1e3:.1f} ms" for r, m in roles.items()))
            continue
        for role, median in roles.items():
            if role != base:
                tr.write_line(f"{group}: {base} {roles[base] * 1e3:.1f} ms, {role} {median * 1e3:.1f} ms "
                              f"-> {roles[base] / median:.2f}x")
    for line in _NOTES:
        tr.write_line(line)
