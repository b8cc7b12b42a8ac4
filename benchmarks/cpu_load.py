"""The CPU load of everything else on the machine while a benchmark times something (bench_serve, bench_chat).

    with ForeignLoad(pids=[server.pid]) as load:     # the benchmark's own process is always counted as its own
        ...timed part...
    load.cores      # busy cores of other processes, on average over the timed part
    write_unless_contended(report, load, output)    # verdict in the report; written only when "OK", else exit 3

Busy CPU time comes from /proc/stat (all cores) less this process's CPU time (getrusage: every thread, torch's
included) and that of `pids` (/proc/PID/stat, e.g. a server subprocess). As in bench_train, a figure over the limit
marks the run contended: on 2 shared cores it flatters whichever side suffers less, so it is not a result.
"""
import json
import os
import pathlib
import resource
import sys
import time

from absl import flags

MIN_SECONDS = 2.0   # /proc/stat counts clock ticks: a shorter timed part cannot say it was quiet
MAX_FOREIGN = flags.DEFINE_float("max_foreign_load", 0.1, "Foreign busy cores above which the run is contended.")


def busy_cpu_seconds() -> float:
    """The machine's busy CPU seconds so far (all cores), from /proc/stat."""
    fields = list(map(int, open("/proc/stat").readline().split()[1:9]))
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (0 when it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(pids=()) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + sum(process_cpu_seconds(pid) for pid in pids)


class ForeignLoad:
    """Measures the foreign busy cores over a `with` block (`cores`, `seconds` once it has ended)."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.cores = self.seconds = 0.0

    def __enter__(self):
        self._start = (busy_cpu_seconds(), own_cpu_seconds(self.pids), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = busy_cpu_seconds(), own_cpu_seconds(self.pids), time.perf_counter()
        self.seconds = wall - self._start[2]
        foreign = (busy - self._start[0]) - (own - self._start[1])
        self.cores = round(max(0.0, foreign) / max(self.seconds, 1e-9), 3)
        return False


def verdict(cores: float, seconds: float, limit: float) -> str:
    if seconds < MIN_SECONDS:
        return "TOO-SHORT"
    return "CONTENDED" if cores > limit else "OK"


def write_unless_contended(report: dict, load: ForeignLoad, output) -> None:
    """Adds the load and its verdict to `report`; writes it to `output` when the run was quiet, else prints it
    with the verdict and exits with code 3 (the figures are not a result)."""
    report.update(verdict=verdict(load.cores, load.seconds, MAX_FOREIGN.value), foreign_load_cores=load.cores,
                  timed_seconds=round(load.seconds, 1), max_foreign_load=MAX_FOREIGN.value,
                  quiet_run=os.environ.get("QUIET_RUN") == "1")
    print(f"foreign load {load.cores} cores over {load.seconds:.1f} s: {report['verdict']}")
    if report["verdict"] != "OK":
        print(json.dumps(report))
        print(f"{report['verdict']}: {output} not written; these figures are not a result", file=sys.stderr)
        sys.exit(3)
    path = pathlib.Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
