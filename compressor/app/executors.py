"""Running a plan's steps: workers run methods and store blobs; the driver alone writes
the catalog.

The driver gives each step's worker (a local process, or a Ray task) the catalog rows
the step reads (:meth:`Store.catalog_slice`: its inputs, their ancestors, what was made
from them) and where blobs live; the worker never opens ``store.db``. It runs the step
with :func:`compressor.app.runs.run_method` (``publish``: blobs stored, no catalog rows) and
returns a :class:`~compressor.app.runs.PendingArtifact`; the driver commits it. A worker killed mid-step leaves at most unreferenced blobs
(``store gc`` keeps them for its grace period, then removes them) and its step is
run again. Steps whose inputs failed are not run; the others go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

from compressor.app.plans import Step
from compressor.errors import CompressorError, UsageError

RETRIES = 3  # new runs of a step whose worker died, before it counts as failed


@dataclasses.dataclass
class StepResult:
    """How a step ended: ``done``, ``reused``, ``failed`` or ``blocked`` (an input failed)."""

    name: str
    verb: str
    status: str
    artifact: str | None = None  # label (NAME@V) of the artifact made, reused or scored
    artifact_id: str | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    attempts: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def task_of(step: Step, ids: dict[str, str], store) -> dict:
    """What a worker needs to run ``step`` (picklable): store references resolved to ids
    (earlier steps' too), the catalog rows they lead to, and the blob storage's URL."""
    stored: list[str] = []
    paths: list[str] = []

    def arg(x):
        if isinstance(x, tuple):  # an earlier step
            stored.append(ids[x[1]])
            return ids[x[1]]
        path = Path(x).expanduser()
        if path.exists():  # an input seen before has a row (its id if its files are unchanged)
            paths.append(str(path.resolve()))
            seen = store.external_at(paths[-1])
            stored.extend([seen] if seen else [])
            return x
        name, mark, pick = x.rpartition("#") if "#" in x else (x, "", "")
        try:
            found = store.resolve(name).id
        except CompressorError:  # not in the store: the worker says what it is not
            return x
        stored.append(found)
        return found + mark + pick

    task = {
        "name": step.name,
        "verb": step.verb,
        "kind": step.kind,
        "plugin": step.plugin,
        "inputs": [arg(x) for x in step.inputs],
        "base": arg(step.base) if step.base is not None else None,
        "ref": arg(step.ref) if step.ref is not None else None,
        "out": step.out,
        "dtype": step.dtype,
        "options": dict(step.options),
    }
    task["catalog"] = store.catalog_slice(stored, paths)
    task["blobs"] = store.blobs.url if store.blobs.remote else None
    return task


def run_task(store_root: str, task: dict, threads: int | None = None) -> dict:
    """Run one step in a worker: ``{"ok": PendingArtifact | record | eval result}`` or
    ``{"error": message}``. The catalog it reads is the slice the task carries; nothing
    here writes one. ``store_root`` is the store (for its local blobs and temp space)
    or, with remote blobs, any scratch directory."""
    from compressor.app import export, runs
    from compressor.store import Store

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        st = Store.worker_view(Path(store_root), task["blobs"], task["catalog"])
        try:
            if task["kind"] is not None:
                out = runs.run_method(
                    task["kind"],
                    task["plugin"],
                    task["inputs"],
                    base=task["base"],
                    options=task["options"],
                    name=task["name"],
                    store=st,
                    plan=runs.PlanStep(part=task.get("part")),
                )
            elif task["verb"] == "eval":
                out = _eval(st, task)
            else:
                out = export.export(
                    task["ref"],
                    task["out"],
                    base=task["base"],
                    dtype=task["dtype"],
                    store=st,
                    force=True,
                )
        finally:
            st.close()
    except CompressorError as e:
        return {"error": str(e)}
    except Exception as e:  # a crash is this step's failure, not the plan's
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ok": out}


def _eval(st, task: dict) -> dict:
    """Score the step's ref unless it holds scores of the same request: the same data
    (by content), options and base."""
    from compressor.app import evaluate
    from compressor.app.eval_options import EVAL_OPTIONS
    from compressor.app.refs import resolve
    from compressor.method import parse_options

    values = parse_options(EVAL_OPTIONS, task["options"], "eval")
    if values["data"] is None or not Path(values["data"]).is_file():
        resolved = None  # evaluate says what is wrong with the data
    else:
        resolved = resolve(st, task["ref"])
    try:
        if resolved is not None and _scored_before(st, resolved, values, task["base"]):
            return {"reused": True, "artifact_id": resolved.artifact_id}
        return evaluate.evaluate(  # on the input resolved here: a path is not hashed twice
            task["ref"],
            task["options"],
            base=task["base"],
            store=st,
            record=False,
            resolved=resolved,
        )
    finally:
        if resolved is not None:
            resolved.source.close()


def _scored_before(st, resolved, values: dict, base: str | None) -> bool:
    """Whether the resolved ref holds scores of this request (an input path is known by
    its content's id: hashed here, so scoring it need not hash it again)."""
    from compressor.app.evaluate import request_digest

    artifact_id = resolved.artifact_id
    if resolved.external is not None:
        resolved.source.identified()
    try:
        scored = st.get(artifact_id).manifest.get("scored", {})
    except CompressorError:  # an input never scored (or seen) before
        return False
    return scored.get(Path(values["data"]).stem) == request_digest(values, base)


def commit_result(store, step: Step, out: dict, started: float, attempts: int) -> StepResult:
    """The driver's half of a step: commit what its worker returned, or record its error."""
    from compressor.app.runs import PendingArtifact

    took = time.monotonic() - started
    res = StepResult(step.name, step.verb, "done", seconds=took, attempts=attempts)
    if "error" in out:
        res.status, res.error = "failed", out["error"]
        return res
    value = out["ok"]
    if isinstance(value, PendingArtifact):
        record = value.commit(store)
    elif isinstance(value, dict) and "metrics_for" in value:
        artifact_id, metrics, externals, requests = value["metrics_for"]
        store.set_metrics(artifact_id, metrics, externals=externals, requests=requests)
        record = store.get(artifact_id)
        res.metrics = metrics
    elif isinstance(value, dict) and value.get("reused"):
        record = store.get(value["artifact_id"])
        res.status = "reused"
    elif isinstance(value, Path):
        res.artifact = str(value)
        return res
    else:  # an artifact the same method made from the same inputs before
        record = value
        res.status = "reused"
    res.artifact, res.artifact_id = record.label, record.id
    if not res.metrics:
        res.metrics = dict(record.metrics)
    return res


def joined(store, outs: list[dict]) -> dict:
    """The worker results of a split merge's parts as one: the first error, else an
    artifact a part reused, else the parts joined into one artifact (index and shards)."""
    from compressor.app.runs import PendingArtifact, join_parts

    for out in outs:
        if "error" in out:
            return out
    for out in outs:
        if not isinstance(out["ok"], PendingArtifact):
            return out
    return {"ok": join_parts([out["ok"] for out in outs], store.tmp_root)}


def run_steps(
    executor, store, steps: list[Step], on_event=None, retries: int = RETRIES
) -> list[StepResult]:
    """Run every step, each when its inputs are done, as many at once as the executor
    takes (a merge with ``split`` as that many tasks, one per group of tensors); a task
    whose worker died runs again, up to ``retries`` times; return the results in plan
    order."""
    on_event = on_event or (lambda result, done, total: None)
    results: dict[str, StepResult] = {}
    ids: dict[str, str] = {}
    waiting = list(steps)
    running = {}  # handle -> (step, part, started, attempts)
    parts: dict[str, dict] = {}  # split step -> {part k: worker result}
    total = len(steps)

    unhashed = _Unhashed(store)

    def finish(res: StepResult):
        results[res.name] = res
        if res.artifact_id:
            ids[res.name] = res.artifact_id
            unhashed.done(res.name)
        on_event(res, len(results), total)

    def submit(step: Step, part: int | None, started: float, attempts: int):
        task = task_of(step, ids, store)
        if part is not None:
            task["part"] = (part, step.split)
        running[executor.submit(task)] = (step, part, started, attempts)

    while waiting or running:
        for step in list(waiting):
            bad = [d for d in step.after if d in results and d not in ids]
            if bad:
                waiting.remove(step)
                finish(StepResult(step.name, step.verb, "blocked", error=f"{bad[0]} failed"))
        ready = [s for s in waiting if all(d in ids for d in s.after)]
        hashing = {p for step, *_ in running.values() for p in unhashed.of(step)}
        while ready and executor.has_room(len(running)):
            step = min(ready, key=lambda s: unhashed.shared(s, hashing))  # ties: plan order
            ready.remove(step)
            waiting.remove(step)
            hashing.update(unhashed.of(step))
            started = time.monotonic()
            if step.split > 1:
                parts[step.name] = {}
                for k in range(1, step.split + 1):
                    submit(step, k, started, 1)
            else:
                submit(step, None, started, 1)
        if not running:
            continue
        for handle, out in executor.wait(list(running)):
            step, part, started, attempts = running.pop(handle)
            if out is None:  # the worker died: run the task again
                if attempts <= retries:
                    submit(step, part, started, attempts + 1)
                    continue
                out = {"error": f"its worker died {attempts} times"}
            if part is not None:
                parts[step.name][part] = out
                if len(parts[step.name]) < step.split:
                    continue
                got = parts.pop(step.name)
                out = joined(store, [got[k] for k in range(1, step.split + 1)])
            try:
                res = commit_result(store, step, out, started, attempts)
            except CompressorError as e:  # the catalog refused it: this step failed
                res = StepResult(step.name, step.verb, "failed", error=str(e), attempts=attempts)
            finish(res)
    return [results[s.name] for s in steps]


class _Unhashed:
    """Which input paths of the plan's steps the store has no digest for yet. A step's
    worker hashes those (an expert's safetensors, a base model's) and the driver records
    their digests when it commits the step, so two steps that read one such file are
    better not run at once: both would read and hash it whole."""

    def __init__(self, store):
        self.store = store
        self.paths: dict[str, list[str]] = {}  # step name -> its input paths
        self.known: set[str] = set()  # paths with a digest in the catalog
        self.asked: set[str] = set()  # paths looked up in the catalog

    def of(self, step: Step) -> list[str]:
        """The input paths of ``step`` with no digest in the catalog yet."""
        if step.name not in self.paths:
            found = [x for x in [*step.inputs, step.base, step.ref] if isinstance(x, str)]
            found = [Path(x).expanduser() for x in found]
            self.paths[step.name] = [str(p.resolve()) for p in found if p.exists()]
        out = []
        for p in self.paths[step.name]:
            if p not in self.asked:
                self.asked.add(p)
                if self.store.external_at(p) is not None:
                    self.known.add(p)
            if p not in self.known:
                out.append(p)
        return out

    def shared(self, step: Step, hashing: set[str]) -> int:
        """How many of ``step``'s unhashed inputs a running step is hashing already:
        steps are started fewest first (one expert at two densities on two workers would
        read and hash it twice at once)."""
        return sum(p in hashing for p in self.of(step)) if hashing else 0

    def done(self, name: str) -> None:
        """Step ``name`` was committed: the digests of its input paths are known."""
        self.known.update(self.paths.get(name, []))


class LocalExecutor:
    """``-j N`` worker processes on this machine (spawned: no state shared with the driver),
    each with ``threads`` CPU threads (default: its share of the machine's cores)."""

    def __init__(self, store_root: Path, jobs: int, threads: int | None = None):
        self.store_root = str(store_root)
        self.jobs = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        self._pool = None

    def _new_pool(self):
        ctx = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.jobs, mp_context=ctx, initializer=_die_with, initargs=(os.getpid(),)
        )

    def has_room(self, running: int) -> bool:
        return running < self.jobs

    def submit(self, task: dict):
        if self._pool is None:
            self._new_pool()
        try:
            return self._pool.submit(run_task, self.store_root, task, self.threads)
        except concurrent.futures.process.BrokenProcessPool:
            self._new_pool()
            return self._pool.submit(run_task, self.store_root, task, self.threads)

    def wait(self, handles):
        """(handle, result or None if its worker died) for the handles that finished."""
        done, _ = concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED)
        out = []
        broken = False
        for f in done:
            try:
                out.append((f, f.result()))
            except concurrent.futures.process.BrokenProcessPool:
                broken = True
                out.append((f, None))
        if broken:  # every step still on the dead pool is lost with it: run those again
            for f in handles:
                if f not in done:
                    f.cancel()
                    out.append((f, None))
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        return out

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _die_with(driver: int) -> None:
    """In a worker: exit when the driver dies (a killed driver leaves no worker behind,
    holding its pipes or a half-done step)."""
    import ctypes
    import threading

    try:  # Linux: the kernel sends SIGKILL when the parent exits
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == driver:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class RayExecutor:
    """Each step a Ray task (``threads`` CPUs and torch threads, memory hinted from the
    inputs' sizes) on an existing cluster (``address``) or on one started for the run on
    this machine (with ``jobs`` × ``threads`` CPUs, else all of them). At most ``jobs``
    tasks (else as many as the cluster's CPUs hold) are in flight."""

    def __init__(
        self,
        store_root: Path,
        address: str | None,
        jobs: int | None,
        retries: int = RETRIES,
        threads: int = 1,
    ):
        try:
            import ray
        except ImportError:
            raise UsageError("the ray executor needs Ray: pip install 'compressor[ray]'") from None
        self.ray = ray
        self.store_root = str(store_root)
        self._started = not ray.is_initialized()
        if self._started:
            here = {"num_cpus": jobs * threads if jobs else os.cpu_count()}
            ray.init(
                include_dashboard=False,
                log_to_driver=False,
                **({"address": address} if address else here),
            )
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if threads > cpus:
            self.close()
            raise UsageError(
                f"a step of {threads} threads needs {threads} CPUs; the Ray cluster has {cpus}"
            )
        self.threads = threads
        self.slots = max(1, min(jobs or cpus, cpus // threads))
        self._remote = ray.remote(num_cpus=threads, max_retries=retries)(run_ray_task)
        # a cluster started here dies with this driver, its workers at once (not seconds
        # later, mid-step): each task watches this process
        self._driver = os.getpid() if self._started and not address else None

    def has_room(self, running: int) -> bool:
        return running < self.slots

    def submit(self, task: dict):
        memory = memory_hint(task)
        remote = self._remote.options(memory=memory) if memory else self._remote
        return remote.remote(self.store_root, task, self.threads, self._driver)

    def wait(self, handles):
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayError as e:  # retries used up
                out.append((ref, {"error": f"its Ray task failed: {type(e).__name__}"}))
        return out

    def close(self):
        if self._started:
            self.ray.shutdown()


def run_ray_task(store_root: str, task: dict, threads: int, driver: int | None) -> dict:
    """A Ray task: :func:`run_task`, in a worker that exits when ``driver`` (a process on
    this machine that started the cluster) is gone."""
    if driver is not None:
        exit_without(driver)
    return run_task(store_root, task, threads)


_WATCHED: set[int] = set()  # drivers a Ray worker process watches (it runs many tasks)


def exit_without(driver: int) -> None:
    """Kill this worker process as soon as ``driver`` is gone (dead, or a zombie not yet
    reaped). A shell loop over /proc does it where there is one: a thread in this process
    waits for the GIL, which a step's native code can hold for seconds."""
    import subprocess
    import threading

    if driver in _WATCHED:
        return
    _WATCHED.add(driver)
    me = os.getpid()
    if Path(f"/proc/{me}/stat").exists():
        alive = '[ -e /proc/{0} ] && [ "$(sed "s/.*) //" /proc/{0}/stat | cut -d" " -f1)" != Z ]'
        loop = (
            f"while {alive.format(driver)} && [ -e /proc/{me} ]; do sleep 0.1; done; "
            f"kill -9 {me} 2>/dev/null"
        )
        subprocess.Popen(["/bin/sh", "-c", loop], stdin=subprocess.DEVNULL, close_fds=True)
        return

    def watch():  # elsewhere: poll from a thread
        while True:
            try:
                os.kill(driver, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def memory_hint(task: dict) -> int | None:
    """Bytes a step may hold: twice its largest input (a path's safetensors files, or a
    stored artifact's bytes from the catalog rows the task carries); None when unknown."""
    stored = {row["id"]: row["bytes"] or 0 for row in task["catalog"]["artifacts"]}
    sizes = []
    for ref in [*task["inputs"], task["base"], task["ref"]]:
        if not isinstance(ref, str):
            continue
        if ref.split("#")[0] in stored:
            sizes.append(stored[ref.split("#")[0]])
        elif Path(ref).exists():
            p = Path(ref)
            files = [p] if p.is_file() else list(p.glob("*.safetensors"))
            sizes.append(sum(f.stat().st_size for f in files))
    return 2 * max(sizes) + (256 << 20) if sizes else None
