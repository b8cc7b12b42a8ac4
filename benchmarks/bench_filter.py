"""Filter recipe throughput, and our wrapper's overhead over calling datatrove directly with the same blocks.

On the FineWeb sample (../shared/data/web/text, first --docs documents split into 4 jsonl.gz files):
  text stages  language → Gopher repetition → Gopher quality → C4 → FineWeb quality → PII → jsonl.gz
  minhash      signatures → buckets → clusters → filter → jsonl.gz (FineWeb's 5-grams, 14 x 8, 64-bit)
each with 1 and 2 workers, as lm.data.filter.run (ours: bad-input accounting, per-block tallies, dropped-document
writers, the report) and as the peer, datatrove's LocalPipelineExecutor over the same blocks (JsonlReader, no
exclusion writers, no report). Every case runs in a fresh process (the forkserver is per process; ours starts one
more, the filter process); the best of --repeats counts. CPU time (this process and the children it waited for) is
measured too (each case waits for its forkserver, so its workers' CPU is counted as ours); the foreign load is the
machine's busy CPU minus all of ours, and results are written only when it stays under 0.1 cores (benchmarks/quiet.py).

    ../shared/tools/quiet-run -- python benchmarks/bench_filter.py [--docs=800] [--repeats=2]
    # writes benchmarks/results/bench_filter.json
"""
import argparse
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import quiet  # noqa: E402

SHARED = pathlib.Path(os.environ.get("LM_SHARED_DATA", REPO.parent / "shared" / "data"))
FINEWEB = SHARED / "web/text/fineweb_sample10BT_2400docs.jsonl.gz"
RESULTS = REPO / "benchmarks" / "results" / "bench_filter.json"
SHARDS = 4


def text_config(workers: int, minhash_only: bool):
    from lm.data import filter as recipe
    c = recipe.default_config("text")
    c.workers = workers
    c.resume = False
    if minhash_only:
        for block in (*recipe.FILTER_BLOCKS, "pii"):
            c[block].enabled = False
    else:
        c.minhash.enabled = False
    return c


def run_ours(inputs: str, workdir: str, workers: int, minhash_only: bool) -> float:
    from lm.data import filter as recipe
    c = text_config(workers, minhash_only)
    start = time.perf_counter()
    recipe.run(c, [inputs], workdir)
    return time.perf_counter() - start


def run_datatrove(inputs: str, workdir: str, workers: int, minhash_only: bool) -> float:
    """The same datatrove blocks and parameters, wired the plain datatrove way (cf. datatrove's examples/fineweb.py)."""
    import multiprocess
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.formatters.pii import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from lm.data import filter as recipe
    c = text_config(workers, minhash_only)
    recipe._preload_workers(c)  # as ours does: same worker start-up
    logs = f"{workdir}/logs"

    def executor(name, pipeline, tasks, depends=None):
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{logs}/{name}",
                                     depends=depends, skip_completed=False)
    start = time.perf_counter()
    if minhash_only:
        mh = c.minhash
        config = MinhashConfig(n_grams=mh.n_grams, num_buckets=mh.num_buckets, hashes_per_bucket=mh.hashes_per_bucket,
                               seed=mh.seed, hash_config=HashConfig(precision=mh.precision))
        s1 = executor("sigs", [JsonlReader(inputs), MinhashDedupSignature(f"{workdir}/sigs", config=config)], workers)
        s2 = executor("buckets", [MinhashDedupBuckets(f"{workdir}/sigs", f"{workdir}/buckets", config=config)],
                      mh.num_buckets, s1)
        s3 = executor("clusters", [MinhashDedupCluster(f"{workdir}/buckets", f"{workdir}/remove", config=config)],
                      1, s2)
        executor("filter", [JsonlReader(inputs), MinhashDedupFilter(f"{workdir}/remove"),
                            JsonlWriter(f"{workdir}/text", expand_metadata=True)], workers, s3).run()
    else:
        from lm.data.filter_blocks import word_splitter
        words = word_splitter(c.word_splitter)
        blocks = [recipe._make_block(b, c[b], None, words) for b in recipe.FILTER_BLOCKS if c[b].enabled]
        pipeline = [JsonlReader(inputs), *blocks, PIIFormatter(**recipe._params(c.pii)),
                    JsonlWriter(f"{workdir}/text", expand_metadata=True)]
        executor("main", pipeline, workers).run()
    return time.perf_counter() - start


def prepare(docs: int, folder: pathlib.Path) -> tuple[int, int]:
    with gzip.open(FINEWEB, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(SHARDS):
        with gzip.open(folder / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines[i::SHARDS])
    return len(lines), sum(len(json.loads(line)["text"].encode()) for line in lines)


def cpu_seconds() -> float:
    import resource
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def case(args):
    """One measurement, in this (fresh) process; prints wall seconds and CPU seconds (this process and the children it
    waited for, the forkserver and its workers included), which other load disturbs far less than wall time."""
    from lm.data import filter as recipe
    runner = run_ours if args.case == "ours" else run_datatrove
    cpu = cpu_seconds()
    seconds = runner(args.inputs, args.workdir, args.workers, args.stage == "minhash")
    recipe._stop_forkserver()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", choices=["ours", "datatrove"])
    parser.add_argument("--stage", choices=["text", "minhash"])
    parser.add_argument("--workers", type=int)
    parser.add_argument("--inputs")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.case:
        return case(args)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_filter_"))
    n_docs, n_bytes = prepare(args.docs, tmp / "inputs")
    results = {"docs": n_docs, "bytes": n_bytes, "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
               "cases": {}}
    with quiet.ForeignLoad() as load:
        measure_all(args, tmp, n_docs, n_bytes, results)
    results["load_average_after"] = os.getloadavg()
    quiet.write_if_quiet(results, RESULTS, load)


def measure_all(args, tmp, n_docs, n_bytes, results):
    for stage in ("text", "minhash"):
        for workers in (1, 2):
            row = {}
            for who in ("ours", "datatrove"):
                times, cpus = [], []
                for r in range(args.repeats):
                    out = subprocess.run([sys.executable, __file__, f"--case={who}", f"--stage={stage}",
                                          f"--workers={workers}", f"--inputs={tmp / 'inputs'}",
                                          f"--workdir={tmp / f'{stage}_{who}_{workers}_{r}'}"],
                                         capture_output=True, text=True, check=True, cwd=REPO)
                    measured = json.loads(out.stdout.strip().splitlines()[-1])
                    times.append(measured["seconds"])
                    cpus.append(measured["cpu_seconds"])
                best = min(times)
                row[who] = {"seconds": round(best, 2), "docs_per_s": round(n_docs / best, 1),
                            "mb_per_s": round(n_bytes / 1e6 / best, 3), "all_seconds": [round(t, 2) for t in times]}
                row[who]["cpu_seconds"] = round(min(cpus), 2)
            row["overhead"] = round(row["ours"]["seconds"] / row["datatrove"]["seconds"] - 1, 3)
            row["cpu_overhead"] = round(row["ours"]["cpu_seconds"] / row["datatrove"]["cpu_seconds"] - 1, 3)
            results["cases"][f"{stage}_{workers}w"] = row
            print(f"{stage:8s} {workers} worker(s): ours {row['ours']['seconds']:6.2f}s "
                  f"({row['ours']['docs_per_s']:6.1f} docs/s, {row['ours']['mb_per_s']:.2f} MB/s)  "
                  f"datatrove {row['datatrove']['seconds']:6.2f}s  overhead {row['overhead']:+.1%} (wall)"
                  f", {row['cpu_overhead']:+.1%} (cpu)", flush=True)


if __name__ == "__main__":
    main()
