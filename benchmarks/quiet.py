"""How quiet the machine was during a benchmark, and the rule for its results: written only from a quiet run.

On 2 shared cores a contended run flatters whichever side suffers less (PyTorch's OpenMP threads collapse under
foreign load), so every benchmark measures the foreign load (the machine's busy CPU time from /proc/stat minus its
own processes', over the wall time), records it in its results JSON, and writes nothing above 0.1
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
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16")


def machine() -> dict:
    """Which CPU the figures come from: ratios against torch/TRL move with the host (two hosts that both call
    themselves "Intel Xeon Processor" differed by 15-25% for PyTorch), so results record family/model/stepping,
    caches and the vector extensions the kernels can use."""
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "cpu family", "model", "model name", "stepping", "flags") and key not in info:
            info[key] = value.strip()
    flags = set(info.pop("flags", "").split())
    caches = {}
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
        caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (index / "size").read_text().strip()
    return dict(cpu=info, cores=os.cpu_count(), caches=caches,
                vector_flags=[flag for flag in VECTOR_FLAGS if flag in flags])


def busy_cpu_seconds() -> float:
    """The machine's busy CPU seconds so far (all cores), from /proc/stat."""
    fields = list(map(int, open("/proc/stat").readline().split()[1:9]))
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (0 when it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Foreign busy cores over a block: busy CPU minus this process's, its reaped children's and `pids`' CPU (e.g. a
    server subprocess still running at exit), per second of wall time."""

    def __init__(self, pids=(), max_load: float = MAX_FOREIGN_LOAD):
        self.pids, self.max_load, self.cores, self.wall = list(pids), max_load, None, None

    def _own(self) -> float:
        return (own_cpu_seconds() + own_cpu_seconds(resource.RUSAGE_CHILDREN)
                + sum(process_cpu_seconds(pid) for pid in self.pids))

    def __enter__(self):
        self._own_start, self._busy, self._start = self._own(), busy_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._start
        own = self._own() - self._own_start
        self.cores = round(max(0.0, busy_cpu_seconds() - self._busy - own) / self.wall, 3)
        return False

    @property
    def verdict(self) -> str:
        # /proc/stat counts clock ticks: a timed part under ~2 s cannot say it was quiet
        return "TOO-SHORT" if self.wall < 2 else ("CONTENDED" if self.cores > self.max_load else "OK")

    def fields(self) -> dict:
        return dict(foreign_load_cores=self.cores, max_foreign_load=self.max_load, timed_seconds=round(self.wall, 1),
                    verdict=self.verdict, quiet_run=os.environ.get("QUIET_RUN") == "1", machine=machine())


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
