"""A CPU budget per process, so that M processes on this box behave like M small machines.

Each `CpuQuota` is a cgroup of its own with a CFS bandwidth limit: `cores` × the period of CPU time per period
(cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` under `/sys/fs/cgroup/cpu/`; v2: `cpu.max` under
`/sys/fs/cgroup/`, with the cpu controller enabled for children). A process is put in it before it executes
(`preexec`, for `subprocess.Popen(preexec_fn=…)`, so its threads and children are in it from the start) or after
(`add(pid)`). `cpu_seconds()` reads what the group has used (v1 `cpuacct.usage`, v2 `cpu.stat usage_usec`).

Needs root (creating a cgroup); `check_available()` says so in one line otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

V1_CPU = Path("/sys/fs/cgroup/cpu")
V1_CPUACCT = Path("/sys/fs/cgroup/cpuacct")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
PREFIX = "gamestream-bench-"


class QuotaUnavailable(RuntimeError):
    """This machine (or this user) cannot give a process a CPU budget."""


def version() -> int:
    """1 or 2: which cgroup hierarchy holds the cpu controller here."""
    if (V1_CPU / "cpu.cfs_quota_us").exists():
        return 1
    if (V2_ROOT / "cgroup.controllers").exists() and "cpu" in (V2_ROOT / "cgroup.controllers").read_text().split():
        return 2
    raise QuotaUnavailable("no cgroup cpu controller here (neither v1 /sys/fs/cgroup/cpu nor v2 cpu.max)")


def check_available() -> int:
    """The cgroup version, or `QuotaUnavailable` saying why a CPU budget cannot be set."""
    if os.geteuid() != 0:
        raise QuotaUnavailable("a CPU budget per process needs root (it creates cgroups); run as root or without "
                               "--quota")
    return version()


class CpuQuota:
    """One cgroup with `cores` of CPU (0.2 = a fifth of one core), removed by `close()`."""

    def __init__(self, name: str, cores: float) -> None:
        if cores <= 0:
            raise ValueError("cores must be positive")
        self.version = check_available()
        self.cores = cores
        self.name = PREFIX + name
        quota = max(1000, int(cores * PERIOD_US))
        if self.version == 1:
            self.path = V1_CPU / self.name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            self.acct = V1_CPUACCT / self.name
            if self.acct.resolve() != self.path.resolve():  # cpu and cpuacct mounted apart
                self.acct.mkdir(exist_ok=True)
        else:
            controllers = V2_ROOT / "cgroup.subtree_control"
            if "cpu" not in controllers.read_text().split():
                controllers.write_text("+cpu")
            self.path = V2_ROOT / self.name
            self.path.mkdir(exist_ok=True)
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            self.acct = self.path

    def _procs_files(self) -> list[Path]:
        files = [self.path / "cgroup.procs"]
        if self.acct.resolve() != self.path.resolve():
            files.append(self.acct / "cgroup.procs")
        return files

    def add(self, pid: int) -> None:
        """Moves process `pid` (with its threads) into the group."""
        for procs in self._procs_files():
            procs.write_text(str(pid))

    def preexec(self) -> None:
        """For `Popen(preexec_fn=quota.preexec)`: the child joins the group before it executes anything."""
        self.add(os.getpid())

    def cpu_seconds(self) -> float:
        """CPU time the group's processes have used so far."""
        if self.version == 1:
            return int((self.acct / "cpuacct.usage").read_text()) / 1e9
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return 0.0

    def throttled_periods(self) -> int:
        """How many periods the group wanted more than its budget (it was held back)."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("nr_throttled",):
                return int(value)
        return 0

    def close(self) -> None:
        """Removes the group once its processes are gone (those still in it are moved to the root group)."""
        for procs in self._procs_files():
            root = procs.parent.parent / "cgroup.procs"
            try:
                for pid in procs.read_text().split():
                    try:
                        root.write_text(pid)
                    except OSError:
                        pass  # it exited meanwhile
            except OSError:
                continue
        for group in {self.path, self.acct}:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # a process leaving the group; the kernel lets go shortly

    def __enter__(self) -> "CpuQuota":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def leftover_groups() -> list[Path]:
    """Groups of this module's left behind (a crashed run), for cleanup and for tests."""
    roots = [V1_CPU, V1_CPUACCT] if (V1_CPU / "cpu.cfs_quota_us").exists() else [V2_ROOT]
    return [p for root in roots if root.is_dir() for p in root.iterdir() if p.name.startswith(PREFIX)]
