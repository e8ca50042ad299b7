"""``run``: a plan of many steps, on worker processes or a Ray cluster."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from compressor.cli.run import metrics_text, strict_json


def print_table(results) -> None:
    """Steps, status, artifact and key metrics, one row each."""
    rows = [("step", "status", "artifact", "seconds", "metrics")]
    for r in results:
        rows.append(
            (
                r.name,
                r.status,
                r.artifact or (r.error or "")[:60],
                f"{r.seconds:.1f}",
                metrics_text(r.metrics, 3) if r.status in ("done", "reused") else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo(
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        )


def register(cli):
    @cli.command("run")
    @click.argument("plan", type=click.Path(dir_okay=False))
    @click.option("--dry-run", is_flag=True, help="Print the steps and their order; run nothing.")
    @click.option(
        "-j",
        "--jobs",
        type=click.IntRange(min=1),
        default=None,
        help="Steps run at once: local worker processes (default 1), or Ray tasks (default: "
        "as many as the cluster's CPUs hold; a cluster started here gets -j x --threads CPUs).",
    )
    @click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="local: worker processes on this machine; ray: a Ray cluster.",
    )
    @click.option("--ray-address", help="An existing Ray cluster (default: start one here).")
    @click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads of each step (a Ray task reserves that many CPUs); default: local, "
        "this machine's cores shared among the -j workers; Ray, 1.",
    )
    @click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=3,
        show_default=True,
        help="Runs again of a step whose worker died.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
    @click.pass_obj
    def run_plan(state, plan, dry_run, jobs, executor, ray_address, threads, retries, as_json):
        """Run the steps of PLAN (YAML): apply, merge, extract, train, sample, eval, export.

        Steps run when the steps they read are done, several at once; a step whose
        method, version, inputs and options match a stored artifact reuses it, so a
        plan run again does only what is missing. A failed step stops the steps
        that read it, not the others. Workers store blobs; this process alone
        writes the catalog.
        """
        from compressor.app.executors import LocalExecutor, RayExecutor, run_steps
        from compressor.app.plans import load_plan
        from compressor.errors import CompressorError

        steps = load_plan(plan)
        if dry_run:
            if as_json:
                click.echo(
                    json.dumps(
                        [{"name": s.name, "run": s.describe(), "after": s.after} for s in steps]
                    )
                )
                return
            for i, s in enumerate(steps, 1):
                after = f"  after {', '.join(s.after)}" if s.after else ""
                click.echo(f"{i:>3}. {s.name}: {s.describe()}{after}")
            return
        st = state.store
        if executor == "ray":
            ex = RayExecutor(st.root, ray_address, jobs, retries, threads or 1)
        else:
            ex = LocalExecutor(st.root, jobs or 1, threads)

        def event(res, done, total):
            if not state.quiet:
                what = res.artifact or res.error or ""
                click.echo(f"[{done}/{total}] {res.status} {res.name}: {what}", err=True)

        # Ray prints its cluster's messages (a worker died, a task retried) on stdout:
        # sent to stderr, stdout keeps only the table or the JSON
        with contextlib.redirect_stdout(sys.stderr):
            try:
                results = run_steps(ex, st, steps, event, retries)
            finally:
                ex.close()
        if as_json:
            click.echo(strict_json([r.to_json() for r in results]))
        else:
            print_table(results)
        bad = [r for r in results if r.status in ("failed", "blocked")]
        if bad:
            raise CompressorError(
                f"{len(bad)} of {len(results)} steps did not finish ({bad[0].name}: {bad[0].error})"
            )
