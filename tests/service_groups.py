"""Service groups for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``).

The tests that wait on a service form one group each, by the fixture they use: every test using
``engine`` (the Docker engine, tests/test_container.py) is in group ``docker``, ``slurm_cluster``
in ``slurm``, ``vllm_judge`` in ``vllm-judge``. A group runs on one worker, one test after another,
so its session fixture starts the service once (session fixtures are per worker) and the SLURM
tests never compete for the 2-node cluster; the other worker runs the compute tests meanwhile.

xdist's own ``xdist_group`` grouping appends the group to each node id on the workers, which
pytest 9.2 no longer allows (pytest-dev/pytest-xdist#1386: the marks are silently ignored). So the
workers write their ``{node id: group}`` map to a file, and the controller's scheduler, a
``LoadGroupScheduling`` that reads it, puts each group in one work unit; a test without a group
is a unit of its own, as in ``--dist load``. The marks are still added, so a fixed xdist also works.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

GROUPS = {"engine": "docker", "slurm_cluster": "slurm", "vllm_judge": "vllm-judge"}
ENV = "HHDPO_XDIST_GROUPS"  # the directory the workers write their maps to (set by the controller)


def group_of(item) -> str | None:
    names = getattr(item, "fixturenames", ())
    return next((g for fixture, g in GROUPS.items() if fixture in names), None)


def configure(config) -> None:
    """On the controller of an xdist run: a fresh directory for the maps, inherited by the workers."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    os.environ[ENV] = tempfile.mkdtemp(prefix="hhdpo-xdist-groups-")


def share_cores(config) -> None:
    """On an xdist worker: its share of the cores (hhdpo's threads_per_process) for everything its
    tests start, as OMP_NUM_THREADS inherited by each training, generation and SLURM job."""
    if not hasattr(config, "workerinput"):
        return
    from hhdpo.core.distenv import threads_per_process

    os.environ["OMP_NUM_THREADS"] = threads_per_process(int(config.workerinput.get("workercount", 1)))
    if "torch" in sys.modules:  # its thread pool has read the environment already
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def mark(config, items) -> None:
    """On a worker: mark each service test with its group and write the map for the controller."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    groups = {}
    for it in items:
        group = group_of(it)
        if group:
            groups[it.nodeid] = group
            _groups_seen[it.nodeid] = group
            if it.get_closest_marker("xdist_group") is None:
                it.add_marker(pytest.mark.xdist_group(group))
    out = os.environ.get(ENV)
    if out and hasattr(config, "workerinput"):
        tmp = Path(out) / f".{config.workerinput['workerid']}.json"
        tmp.write_text(json.dumps(groups))
        tmp.replace(Path(out) / f"{config.workerinput['workerid']}.json")


DURATIONS = Path(__file__).with_name("durations.json")


def slowest_first(items) -> None:
    """Known-slow tests first (seconds from a clean-clone CI run's ``--durations``, in durations.json):
    xdist hands out tests one unit at a time, so a long test started last keeps one worker busy while
    the other idles. Modules stay whole (their module-scoped fixtures are set up once), the one with
    the slowest test first, and so are tests within a module; unknown ones keep their order. Only the
    order depends on the file: refresh it from a CI log when the slow tests change."""
    try:
        seconds = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return
    module = {}
    for it in items:
        path = it.nodeid.split("::", 1)[0]
        module[path] = max(module.get(path, 0), seconds.get(it.nodeid, 0))
    items.sort(key=lambda it: (-module[it.nodeid.split("::", 1)[0]], -seconds.get(it.nodeid, 0)))  # stable


def make_scheduler(config, log):
    if getattr(config.option, "dist", "no") != "loadgroup" or not os.environ.get(ENV):
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ServiceGroupScheduling(LoadGroupScheduling):
        """loadgroup with the groups read from the workers' maps (see the module's doc)."""

        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # first called once every worker has collected
                self._groups = {}
                for f in sorted(Path(os.environ[ENV]).glob("*.json")):
                    self._groups.update(json.loads(f.read_text()))
            group = self._groups.get(nodeid)
            if group:
                _groups_seen[nodeid] = group
            return group if group else super()._split_scope(nodeid)

    return ServiceGroupScheduling(config, log)


class BusyTime:
    """Seconds each xdist worker and each service group spent in tests (setup, call and teardown),
    printed after ``--durations``: the busiest worker is the suite's wall time, and the groups show
    what sits on its path."""

    def __init__(self):
        self.workers: dict[str, float] = {}
        self.groups: dict[str, float] = {}

    def pytest_runtest_logreport(self, report) -> None:
        worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "main")
        self.workers[worker] = self.workers.get(worker, 0.0) + report.duration
        group = _groups_seen.get(report.nodeid, "other tests")
        self.groups[group] = self.groups.get(group, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.workers:
            return
        fmt = lambda d: ", ".join(f"{k} {v:.0f} s" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
        terminalreporter.write_line(f"busy time per worker: {fmt(self.workers)}")
        terminalreporter.write_line(f"busy time per group: {fmt(self.groups)}")


_groups_seen: dict[str, str] = {}  # node id -> group, filled by the controller's scheduler (or mark() without xdist)


def unconfigure(config) -> None:
    out = os.environ.get(ENV)
    if out and not hasattr(config, "workerinput"):
        shutil.rmtree(out, ignore_errors=True)
        os.environ.pop(ENV, None)
