"""What hashing a remote blob read in part costs: a `merge --config` slice of two layers
of a model whose blobs are on S3 (moto's server on 127.0.0.1, in its own process), with
the check on (the default: the blob is fetched whole to be hashed before the commit) and
off (COMPRESSOR_VERIFY_READS=0: only the slice's byte ranges move), in one run.

    python scripts/bench_remote_slice.py                # 16 layers of 1024 (~0.8 GB fp32)
    python scripts/bench_remote_slice.py --layers 4     # a quick smoke run
    python scripts/bench_remote_slice.py --write-docs   # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import write_docs_section  # noqa: E402

MARK = "remote-slice"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_bytes() -> int:
    """Bytes through the loopback interface so far: the S3 traffic (run on an idle machine)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import boto3
    from click.testing import CliRunner

    from compressor.cli import cli
    from compressor.demo.models import save_tiny_llama

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = save_tiny_llama(
                tmp / "model", layers=args.layers, hidden=args.hidden, vocab=args.vocab
            )
            size = (model / "model.safetensors").stat().st_size
            store = tmp / "store"
            run = CliRunner().invoke
            base = ["--store", str(store), "--quiet"]
            r = run(
                cli, [*base, "--blobs", "s3://bench/p", "store", "import", str(model), "-n", "m"]
            )
            assert r.exit_code == 0, r.output
            config = tmp / "slice.yml"
            config.write_text(
                "slices:\n  - sources:\n      - model: m\n        layer_range: [2, 4]\n"
                "merge_method: passthrough\n"
            )
            rows = []
            for label, verify in (("hashed whole (default)", "1"), ("unchecked", "0")):
                os.environ["COMPRESSOR_VERIFY_READS"] = verify
                # the blob cache would serve the second run: each run gets a fresh store view
                before, t0 = _read_bytes(), time.monotonic()
                r = run(cli, [*base, "merge", "--config", str(config), "-n", f"s{verify}"])
                seconds, moved = time.monotonic() - t0, _read_bytes() - before
                assert r.exit_code == 0, r.output
                rows.append((label, seconds, moved))
            os.environ.pop("COMPRESSOR_VERIFY_READS")
    finally:
        server.terminate()
        server.wait()
    lines = [
        f"A {args.layers}-layer Llama of hidden {args.hidden}, vocabulary {args.vocab} "
        f"({size / 1e9:.2f} GB, one fp32 "
        "shard) stored on S3 (moto on 127.0.0.1); a `merge --config` slice of layers 2-3. "
        "Bytes read: the loopback traffic (S3 requests and responses). Command: "
        "`python scripts/bench_remote_slice.py`.",
        "",
        "| slice | wall time (s) | bytes read (MB) | / shard size |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, seconds, moved in rows:
        lines.append(f"| {label} | {seconds:.1f} | {moved / 1e6:.0f} | {moved / size:.2f}x |")
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        write_docs_section(MARK, body, "Reading remote blobs in part: the full hash check")


if __name__ == "__main__":
    main()
