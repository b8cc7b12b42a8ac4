"""How quiet the machine was during a benchmark, and the rule for its results: written only from a quiet run.

On 2 shared cores a contended run flatters whichever side suffers less (PyTorch's OpenMP threads collapse under
foreign load), so every benchmark measures the foreign load (the machine's busy CPU time from /proc/stat minus its
own processes', over the wall time), records it in its results JSON, and writes nothing above --max_foreign_load
cores. Run benchmarks under ../shared/tools/quiet-run, which also waits for quiet and holds a lock.

    with quiet.ForeignLoad() as load:
        ...timed work (in this process or its waited-for children)...
    quiet.write_if_quiet(report, path, load)   # report gains foreign_load_cores / verdict; exits 3 unless OK
"""
import json
import os
import pathlib
import resource
import sys
import time

MAX_FOREIGN_LOAD = 0.1   # busy cores not ours above which figures are not a result


def busy_cpu_seconds() -> float:
    """The machine's busy CPU seconds so far (all cores), from /proc/stat."""
    fields = list(map(int, open("/proc/stat").readline().split()[1:9]))
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class ForeignLoad:
    """Foreign busy cores over a block: busy CPU minus this process's and its reaped children's CPU, per second.
    Work in processes that are still running at exit (pools, servers) must be added with `add_own(seconds)`."""

    def __init__(self, max_load: float = MAX_FOREIGN_LOAD):
        self.max_load, self.extra_own, self.cores, self.wall = max_load, 0.0, None, None

    def __enter__(self):
        self._own = own_cpu_seconds() + own_cpu_seconds(resource.RUSAGE_CHILDREN)
        self._busy, self._start = busy_cpu_seconds(), time.perf_counter()
        return self

    def add_own(self, seconds: float) -> None:
        self.extra_own += seconds

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._start
        own = own_cpu_seconds() + own_cpu_seconds(resource.RUSAGE_CHILDREN) - self._own + self.extra_own
        self.cores = round(max(0.0, busy_cpu_seconds() - self._busy - own) / self.wall, 3)
        return False

    @property
    def verdict(self) -> str:
        # /proc/stat counts clock ticks: a timed part under ~2 s cannot say it was quiet
        return "TOO-SHORT" if self.wall < 2 else ("CONTENDED" if self.cores > self.max_load else "OK")

    def fields(self) -> dict:
        return dict(foreign_load_cores=self.cores, max_foreign_load=self.max_load, timed_seconds=round(self.wall, 1),
                    verdict=self.verdict, quiet_run=os.environ.get("QUIET_RUN") == "1")


def write_if_quiet(report: dict, path, load: ForeignLoad) -> None:
    """Adds the load fields to report; writes it to path only when the run was quiet, else prints it and exits 3."""
    report.update(load.fields())
    if load.verdict != "OK":
        print(json.dumps(report))
        print(f"{load.verdict}: foreign load {load.cores} cores over {load.wall:.1f} s (limit {load.max_load}): "
              f"{path} not written; these figures are not a result", file=sys.stderr)
        sys.exit(3)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path} (foreign load {load.cores} cores: OK)")
