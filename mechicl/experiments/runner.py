"""Running jobs (:class:`~mechicl.analyses.Job`: a grid's, a report's, a command's) into a
content-addressed result store (:mod:`mechicl.experiments.store`), on this machine or on a Ray
cluster.

:func:`run_jobs` adds the jobs each job reads (its analysis's ``inputs``: a pruning curve's
rankings, attribution's exact patching, a report's results), finds each model's identity
(weights and tokenizer hashes; remembered per model file fingerprint so that a model whose jobs
are all finished is not even loaded), skips every job whose key is already in the store, and
runs the rest as soon as their inputs are stored, committing each result atomically as it
finishes. A run killed at any moment and started again therefore computes exactly the missing
jobs. :func:`run_grid` runs a grid file's jobs.

Every job runs through its analysis's record (:mod:`mechicl.analyses`): its run function, its
memory model (batch sizes from a memory budget) and its result type, so the command line, grids
and the report compute the same result, byte for byte, for the same options.

Executors:

- :class:`LocalExecutor` (the default): one model at a time in this process (or models loaded
  already, e.g. by the report).
- :class:`RayExecutor`: one Ray actor per model (each loads its model once and runs that
  model's jobs in order); actors run in parallel as the cluster's resources allow. Results
  (and the inputs a job reads) travel as bytes, so the workers need no shared file system.
  Ray is the existing engine for this: ``ray.init(address=...)`` connects to a cluster.

Analyses computed from other results alone (``overlap``, ``report``) run on this process as
soon as their inputs are stored.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechicl._batching import PASS_KINDS, device_batch_tokens
from mechicl._io import atomic_write_text
from mechicl._version import __version__
from mechicl.analyses import Call, Job
from mechicl.experiments.checkpoints import Checkpoint, checkpoint_table
from mechicl.experiments.grid import Grid, ModelEntry, task_digest
from mechicl.experiments.memory import batch_tokens_for_budget
from mechicl.experiments.store import (
    INDEX_FILE,
    ResultStore,
    as_store,
    read_index,
    read_tree,
    write_tree,
)
from mechicl.inputs.tasks import TASKS, Task, load_task, tasks_registered
from mechicl.model.loading import BUILTIN_MODELS, cache_dir, load_model
from mechicl.plotting import checkpoint_figure, save_figure
from mechicl.results import ResultError, load_result, verify_result

__all__ = ["EXECUTORS", "LocalExecutor", "ModelWorker", "RayExecutor", "RunSummary",
           "compute", "grid_results", "job_keys", "job_result", "model_fingerprint", "run_grid",
           "run_jobs", "sized_job", "sweep_tables", "write_run_outputs"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Workers: load one model, run its jobs, return results as bytes
# --------------------------------------------------------------------------------------------


def sized_job(model: Any, job: Job, task: Task | None, budget: str | int | None) -> Job:
    """``job`` with ``batch_tokens`` chosen from a memory ``budget`` by its analysis's memory
    model and the longest row it feeds the model (unchanged without a budget, or for analyses
    without forward passes)."""
    spec = job.record()
    kind = spec.memory_model(job)
    if budget is None or kind is None or spec.sequence_length is None:
        return job
    tokens = batch_tokens_for_budget(model, budget, seq_len=spec.sequence_length(model, job, task),
                                     analysis=kind)
    return dataclasses.replace(job, options={**job.options, "batch_tokens": tokens})


def compute(job: Job, *, model: Any, tasks: Mapping[str, Task], inputs: Mapping[str, Any],
            provenance: Mapping[str, dict[str, Any]] | None = None,
            progress: bool = False) -> Any:
    """Run ``job`` through its analysis's record: its task loaded from ``tasks``, its inputs'
    results given (``inputs``: name -> loaded result; ``provenance``: where they came from)."""
    spec = job.record()
    job = dataclasses.replace(job, options=spec.resolve(job.options))  # complete, checked
    task = tasks[job.task] if job.task is not None else None
    return spec.run(Call(model=model, job=job, task=task, inputs=dict(inputs),
                         provenance=dict(provenance or {}), progress=progress))


_PASS_TOKENS_KEYS = {kind: "pass_tokens" if kind == "forward" else f"{kind}_pass_tokens"
                    for kind in PASS_KINDS}
"""The manifest key recording the tokens per pass of each kind of pass
(:func:`mechicl._batching.device_batch_tokens`): ``pass_tokens``, ``choices_pass_tokens``,
``copies_pass_tokens``."""


class ModelWorker:
    """Loads one model (lazily) and runs jobs on it; used in-process by
    :class:`LocalExecutor` and as a Ray actor by :class:`RayExecutor`.

    Args:
        entry: the model (``ModelEntry.to_dict()`` form, so that it crosses process borders).
        threads: torch intra-op threads (None: leave as is).
        model: the model, already loaded (kept after :meth:`release`).
        progress: show the analyses' progress bars.
    """

    def __init__(self, entry: dict[str, Any], threads: int | None = None, *,
                 model: Any = None, progress: bool = False):
        self.entry = ModelEntry(**entry)
        self.threads = threads
        self._given = model
        self._model: Any = model
        self.progress = progress

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Use ``threads`` torch threads for the call, then restore the process's setting."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def model(self) -> Any:
        if self._model is None:
            with self._threads():
                self._model = load_model(self.entry.spec, **self.entry.load,
                                         progress=self.progress)
        return self._model

    def release(self) -> None:
        """Drop the model (unless it was given already loaded)."""
        self._model = self._given

    def identity(self) -> dict[str, Any]:
        """``{"weights_sha256", "tokenizer_sha256", "info"}`` of the loaded model."""
        model = self.model()
        with self._threads():
            return _identity(model.info())

    def run(self, job: dict[str, Any], tasks: dict[str, Task],
            inputs: dict[str, dict[str, bytes]] | None = None,
            provenance: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run one job with the data of its tasks and the files of its inputs' results;
        returns ``{"files": {path: bytes}, "seconds", "batch_tokens", "pass_tokens",
        "choices_pass_tokens", "copies_pass_tokens", "device", "threads", "host",
        "linear_kernel"}``
        (``pass_tokens``: the tokens per forward pass the device's batch shape allowed,
        ``choices_pass_tokens`` and ``copies_pass_tokens`` the same for a pass of packed choice
        rows and of masked copies, :func:`mechicl._batching.device_batch_tokens`;
        ``linear_kernel``: what ran the linear layers, :mod:`mechicl.model.kernels`;
        provenance, not key)."""
        # analyses (and the report) find tasks by name: the job's tasks, for this job only
        differ = {name: (lambda task=task: task) for name, task in tasks.items()
                  if name not in TASKS or task_digest(load_task(name)) != task_digest(task)}
        with tasks_registered(differ):
            return self._run(job, tasks, inputs, provenance)

    def _run(self, job: dict[str, Any], tasks: dict[str, Task],
             inputs: dict[str, dict[str, bytes]] | None,
             provenance: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
        model = self.model()
        job_obj = Job.from_dict(job)
        task = tasks.get(job_obj.task) if job_obj.task is not None else None
        job_obj = sized_job(model, job_obj, task, self.entry.memory_budget)
        start = time.perf_counter()
        with self._threads(), tempfile.TemporaryDirectory(prefix="mechicl-job-") as tmp:
            loaded = {}
            for name, files in (inputs or {}).items():
                write_tree(Path(tmp) / name, files)
                loaded[name] = load_result(Path(tmp) / name)
            threads = torch.get_num_threads()
            files = _result_files(compute(job_obj, model=model, tasks=tasks, inputs=loaded,
                                          provenance=provenance, progress=self.progress))
        budget = job_obj.options.get("batch_tokens")
        return {"files": files, "seconds": round(time.perf_counter() - start, 3),
                "batch_tokens": budget, "threads": threads, "host": socket.gethostname(),
                "linear_kernel": getattr(model, "linear_kernel", "plain"),
                **{key: (None if budget is None
                         else device_batch_tokens(model.device, int(budget), kind=kind))
                   for kind, key in _PASS_TOKENS_KEYS.items()},
                "device": str(model.device)}


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


class Executor(Protocol):
    """What :func:`run_grid` needs of an executor: workers (one per model) whose calls return
    futures, and a way to wait for some of them."""

    name: str
    slots: int  # models worked on at once

    def open(self, entry: ModelEntry) -> Any:
        """A worker for the model ``entry`` (it loads the model when first needed)."""

    def submit(self, worker: Any, method: str, *args: Any) -> Any:
        """Call ``worker.method(*args)``; a future of its value."""

    def wait(self, futures: list[Any]) -> list[Any]:
        """Some of ``futures`` that are done (at least one)."""

    def result(self, future: Any) -> Any:
        """A done future's value (its exception is raised)."""

    def close(self, worker: Any) -> None:
        """Release a worker and its model."""

    def shutdown(self) -> None:
        """Release what the executor started (e.g. a local Ray)."""


@dataclass(eq=False)
class _LocalFuture:
    call: Callable[[], Any]
    done: bool = False
    value: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.call()
        except Exception as err:  # noqa: BLE001 - reported per job by run_grid
            self.error = err
        self.done = True


class LocalExecutor:
    """Runs everything in this process, one model at a time, each call when it is waited
    for (so every result is committed as soon as it exists).

    Args:
        threads: torch threads (None: leave as is).
        models: models already loaded, by their name in the jobs (not loaded again, not
            released after the run).
        progress: show the analyses' own progress bars.
    """

    name = "local"
    slots = 1

    def __init__(self, threads: int | None = None, *, models: dict[str, Any] | None = None,
                 progress: bool = False):
        self.threads = threads
        self.models = dict(models or {})
        self.progress = progress

    def open(self, entry: ModelEntry) -> ModelWorker:
        return ModelWorker(entry.to_dict(), threads=self.threads, model=self.models.get(entry.name),
                           progress=self.progress)

    def submit(self, worker: ModelWorker, method: str, *args: Any) -> _LocalFuture:
        return _LocalFuture(lambda: getattr(worker, method)(*args))

    def wait(self, futures: list[_LocalFuture]) -> list[_LocalFuture]:
        first = futures[0]
        if not first.done:
            first.run()
        return [first]

    def result(self, future: _LocalFuture) -> Any:
        if future.error is not None:
            raise future.error
        return future.value

    def close(self, worker: ModelWorker) -> None:
        worker.release()

    def shutdown(self) -> None:
        pass


class RayExecutor:
    """Runs each model's jobs in a Ray actor (see the module docstring).

    Args:
        address: a Ray cluster (``"auto"``, ``"ray://head:10001"``); None starts or joins a
            local Ray. Ignored if Ray is already initialised.
        num_cpus, num_gpus: resources reserved per model worker (a model that needs a GPU:
            ``num_gpus=1`` and ``[models.X] device = "cuda"``).
        threads: torch threads in each worker (default ``num_cpus``).
        max_workers: models worked on at once (default: all; Ray queues what does not fit).
        init_kwargs: further ``ray.init`` arguments (``runtime_env``, ``num_cpus``...).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | float = 1,
                 num_gpus: int | float = 0, threads: int | None = None,
                 max_workers: int | None = None, init_kwargs: dict[str, Any] | None = None):
        try:
            import ray
        except ImportError:
            raise ImportError("the Ray executor needs Ray: pip install 'mechicl[ray]' "
                              "(or pip install ray)") from None
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"num_cpus={num_cpus} must be > 0 and num_gpus={num_gpus} >= 0")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False,
                      **(init_kwargs or {})}
            ray.init(address=address, **kwargs)
            self._started = True
        self.slots = max_workers or 1_000_000
        self._actor = ray.remote(ModelWorker).options(num_cpus=num_cpus, num_gpus=num_gpus)
        self.threads = threads if threads is not None else max(1, int(num_cpus))

    def open(self, entry: ModelEntry) -> Any:
        return self._actor.remote(entry.to_dict(), threads=self.threads)

    def submit(self, worker: Any, method: str, *args: Any) -> Any:
        return getattr(worker, method).remote(*args)

    def wait(self, futures: list[Any]) -> list[Any]:
        ready, _ = self._ray.wait(futures, num_returns=1)
        return ready

    def result(self, future: Any) -> Any:
        return self._ray.get(future)

    def close(self, worker: Any) -> None:
        self._ray.kill(worker)

    def shutdown(self) -> None:
        if self._started:
            self._ray.shutdown()


EXECUTORS: dict[str, type] = {"local": LocalExecutor, "ray": RayExecutor}


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def model_fingerprint(entry: ModelEntry) -> str | None:
    """A fingerprint of the files a model entry loads (paths, sizes, modification times) and
    its load options, or None for hub models (their files are not known before loading).
    Identities are remembered per fingerprint so that finished grids do not load models."""
    spec = entry.spec
    if spec in BUILTIN_MODELS:
        try:
            paths = [BUILTIN_MODELS[spec].locate(cache_dir())]
        except ImportError:
            return None
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            paths = [path]
        else:
            return None
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    payload = json.dumps({"spec": spec, "load": entry.load, "files": files}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class RunSummary:
    """What a run did.

    Attributes:
        jobs: every job with its key (None if its model could not be loaded) and status:
            ``cached`` (found in the store), ``computed``, ``failed``, or ``skipped`` (read
            only by jobs that were stored already); the jobs asked for come first (``asked``
            True), then the jobs they read.
        asked: for each job passed to :func:`run_jobs`, in order, the index of its row in
            ``jobs`` (a job passed twice has one row).
        errors: job description -> error message.
        exceptions: job description (or model) -> the exception (the first per job), to
            re-raise where a caller wants the error itself.
        invalid: key -> why: folders of the store (or seed folders) that failed verification
            (a truncated or edited file, a missing or garbage ``job.json``, an unknown format).
            A job of the run whose stored result is one of them is computed again and its new
            result replaces the bad folder. Each is also logged as a warning.
        seconds: wall time.
        executor: the executor's name.
        store: the store's folder.
    """

    jobs: list[dict[str, Any]] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    exceptions: dict[str, BaseException] = field(default_factory=dict, repr=False)
    invalid: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    executor: str = "local"
    store: str = ""

    def table(self) -> pd.DataFrame:
        """One row per job: analysis, model, task, shots, seed, key, status, seconds, asked."""
        return pd.DataFrame(self.jobs, columns=["analysis", "model", "task", "shots", "seed",
                                                "key", "status", "seconds", "asked"])

    def asked_rows(self) -> list[dict[str, Any]]:
        """The rows of the jobs passed to :func:`run_jobs`, in their order."""
        return [self.jobs[i] for i in self.asked]

    @property
    def counts(self) -> dict[str, int]:
        """How many jobs ended in each status."""
        out = {"cached": 0, "computed": 0, "failed": 0}
        for row in self.jobs:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    @property
    def ok(self) -> bool:
        """No job failed."""
        return not self.errors

    def raise_first(self) -> None:
        """Re-raise the first failure (the exception itself when it happened in this process)."""
        if self.exceptions:
            raise next(iter(self.exceptions.values()))
        if self.errors:
            job, message = next(iter(self.errors.items()))
            raise RuntimeError(f"{job}: {message}")


def _identity(info: Mapping[str, Any]) -> dict[str, Any]:
    """A model's identity for keys: its weights and tokenizer hashes, and its info."""
    return {"weights_sha256": info["weights_sha256"],
            "tokenizer_sha256": info["tokenizer_sha256"], "info": dict(info)}


def _manifest(job: Job, entry: ModelEntry | None, identity: Mapping[str, Any], executor: str,
              seconds: float | None, inputs: list[str], extra: Mapping[str, Any]
              ) -> dict[str, Any]:
    info = identity.get("info", {})
    return {
        "job": job.to_dict(),
        "kind": job.analysis,
        "model": {"weights_sha256": identity.get("weights_sha256"),
                  "tokenizer_sha256": identity.get("tokenizer_sha256"),
                  **{k: info.get(k) for k in ("name", "hf_id", "source", "dtype", "weights",
                                                  "shape", "versions")}},
        "entry": entry.to_dict() if entry is not None else None, "inputs": inputs,
        "mechicl": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": seconds, "executor": executor, **extra,
    }


def _result_files(result: Any) -> dict[str, bytes]:
    """A result's folder as ``{relative path: bytes}`` (saved in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="mechicl-result-") as tmp:
        result.save(Path(tmp) / "result")
        return read_tree(Path(tmp) / "result")


def _job_id(job: Job) -> str:
    return json.dumps(job.to_dict(), sort_keys=True, default=str)


def _with_inputs(jobs: Sequence[Job]) -> tuple[list[Job], list[dict[str, int]], list[int]]:
    """The jobs asked for (each once, in order), then every job they read (recursively, each
    once); the index of each job's inputs; the index of each asked job."""
    out: list[Job] = []
    index: dict[str, int] = {}

    def place(job: Job) -> tuple[int, bool]:
        key = _job_id(job)
        if key in index:
            return index[key], False
        index[key] = len(out)
        out.append(job)
        return index[key], True

    asked = [place(job)[0] for job in jobs]
    deps: list[dict[str, int]] = []
    i = 0
    while i < len(out):  # breadth first: inputs after the jobs that read them
        deps.append({name: place(dep)[0] for name, dep in out[i].inputs().items()})
        i += 1
    return out, deps, asked


def _key(i: int, jobs: Sequence[Job], deps: Sequence[Mapping[str, int]],
         keys: list[str | None], identity: Mapping[str, Any],
         task_data: Mapping[str, str]) -> str:
    """The key of ``jobs[i]`` (its inputs' keys first), memoised in ``keys``."""
    if keys[i] is None:
        inputs = {name: _key(d, jobs, deps, keys, identity, task_data)
                  for name, d in deps[i].items()}
        keys[i] = jobs[i].key(identity, __version__, inputs=inputs, task_data=task_data)
    key = keys[i]
    assert key is not None
    return key


@dataclass
class _ModelPlan:
    """One model's part of a run: its jobs, identity, keys, and what is left to compute."""

    entry: ModelEntry
    jobs: list[int] = field(default_factory=list)  # indices into the run's jobs
    identity: dict[str, Any] | None = None
    fingerprint: str | None = None
    worker: Any = None
    outstanding: int = 0  # calls submitted to the worker and not yet returned


class _Run:
    """The state of one :func:`run_jobs` call (see there)."""

    def __init__(self, jobs: Sequence[Job], entries: Mapping[str, ModelEntry],
                 store: ResultStore, executor: Any, progress: bool,
                 seed_from: Sequence[str | os.PathLike[str]] = (), force: bool = False):
        self.store, self.executor, self.force = store, executor, force
        self.seeds = {} if force else _seed_index(seed_from)
        self.jobs, self.deps, self.asked = _with_inputs(jobs)
        self.readers: list[list[int]] = [[] for _ in self.jobs]  # jobs reading each job
        for i, deps in enumerate(self.deps):
            for d in deps.values():
                self.readers[d].append(i)
        names = sorted({t for job in self.jobs for t in job.task_names()})
        # Workers get the tasks' data, not only their names: tasks registered in this process
        # (or edited) reach Ray workers, and the data's hash is part of every key.
        self.tasks = {name: load_task(name) for name in names}
        self.task_data = {name: task_digest(task) for name, task in self.tasks.items()}
        asked = set(self.asked)
        self.rows = [{"analysis": j.analysis, "model": j.model, "task": j.task,
                      "shots": j.shots, "seed": j.seed, "key": None, "status": "pending",
                      "seconds": None, "asked": i in asked}
                     for i, j in enumerate(self.jobs)]
        self.keys: list[str | None] = [None] * len(self.jobs)
        self.fresh: set[str] = set()  # keys computed by this run
        self.submitted = [False] * len(self.jobs)
        self.summary = RunSummary(asked=list(self.asked), executor=executor.name,
                                  store=str(store.root))
        self.plans: dict[str, _ModelPlan] = {}
        for i, job in enumerate(self.jobs):
            entry = entries.get(job.model) or ModelEntry(name=job.model, spec=job.model)
            self.plans.setdefault(job.model, _ModelPlan(entry)).jobs.append(i)
        # key -> jobs of other models waiting for it: models with identical weights (e.g. two
        # checkpoints) share keys, and each key is computed once even when they run in parallel
        self.in_flight: dict[str, list[int]] = {}
        self.owner: dict[str, int] = {}  # key being computed -> the job computing it
        self.waiting: deque[_ModelPlan] = deque()
        self.open: list[_ModelPlan] = []
        self.active: dict[Any, tuple[str, _ModelPlan, int | None]] = {}  # future -> call
        self.scheduling = False
        self.again = False
        self.bar = tqdm(total=len(self.jobs), desc="jobs", disable=not progress, unit="job")

    # ---- bookkeeping ------------------------------------------------------------------------

    def finish(self, i: int, state: str, seconds: float | None = None,
               error: str | None = None) -> None:
        if self.rows[i]["status"] != "pending":
            return
        self.rows[i] |= {"status": state, "seconds": seconds}
        if error is not None:
            self.summary.errors[self.jobs[i].describe()] = error
        self.bar.update(1)
        if state == "failed":  # whatever reads this job fails too
            for j in self.readers[i]:
                self.finish(j, "failed", error=f"an input failed ({self.jobs[i].describe()})")

    def assign_keys(self, plan: _ModelPlan) -> None:
        """Keys of the plan's jobs, inputs first; stored ones are settled."""
        for i in plan.jobs:
            self.keys[i] = _key(i, self.jobs, self.deps, self.keys, plan.identity or {},
                                self.task_data)
            self.rows[i]["key"] = self.keys[i]
        for i in plan.jobs:
            k = self.keys[i]
            assert k is not None
            if not self.force and self.stored(k, self.jobs[i]) or self.narrowed(plan, i):
                self.finish(i, "cached")
            elif k in self.owner and self.owner[k] != i:  # another model computes it
                self.in_flight.setdefault(k, []).append(i)
            else:
                self.owner[k] = i
        self.skip_unneeded(plan)

    def skip_unneeded(self, plan: _ModelPlan) -> None:
        """Jobs read only by stored jobs need not run (e.g. the inputs of a stored report)."""
        stack = [i for i in plan.jobs if self.rows[i]["asked"]
                 and self.rows[i]["status"] == "pending"]
        needed = set(stack)
        while stack:
            for d in self.deps[stack.pop()].values():
                if d not in needed and self.rows[d]["status"] == "pending":
                    needed.add(d)
                    stack.append(d)
        for i in plan.jobs:
            k = self.keys[i]
            if self.rows[i]["status"] != "pending" or i in needed or self.in_flight.get(k):
                continue  # (another model waits for this key: it is computed for that one)
            if self.owner.get(k) == i:  # let another model compute the key if it needs it
                del self.owner[k]
            self.finish(i, "skipped")

    def stored(self, key: str, job: Job) -> bool:
        """``key`` is in the store, intact (:meth:`ResultStore.verify`), or in a seed folder
        (then verified and copied in). A stored folder that fails verification is logged,
        recorded in the summary's ``invalid`` and counts as missing: its job is computed
        again and replaces it."""
        try:
            if self.store.verify(key):
                return True
        except ResultError as err:
            log.warning("stored result %s is not intact, computing it again: %s", key, err)
            self.summary.invalid[key] = str(err)
        path, entry = self.seeds.get(key, (None, {}))
        if path is None:
            return False
        try:
            meta = verify_result(path)  # its parts too: a report's or a scan's sub-results
        except ResultError as err:
            log.warning("not reusing %s: %s", path, err)
            self.summary.invalid.setdefault(key, str(err))
            return False
        kind, model = meta["kind"], meta["model"]
        if kind != job.record().result_type.__name__:
            log.warning("not reusing %s: it holds a %s, %s gives a %s", path, kind,
                        job.analysis, job.record().result_type.__name__)
            return False
        identity = {"weights_sha256": model.get("weights_sha256"),
                    "tokenizer_sha256": model.get("tokenizer_sha256"), "info": model}
        self.store.put_folder(key, _manifest(
            job, None, identity, "imported", entry.get("seconds"), [],
            {"imported_from": str(path)}), path)
        log.info("reusing %s", path)
        return True

    def narrowed(self, plan: _ModelPlan, i: int) -> bool:
        """Job ``i``'s result from a stored result of the same analysis computed for more
        values of its ``narrow_option`` (a scan of more scores), if there is one (with
        ``force``, only one computed by this run)."""
        job = self.jobs[i]
        spec = job.record()
        if spec.narrow_option is None or spec.narrow is None:
            return False
        option = spec.option(spec.narrow_option)
        values = list(job.options[option.name])
        extra = [v for v in option.allowed() or [] if v not in values]
        inputs = {name: self.keys[d] for name, d in self.deps[i].items()}
        for size in range(1, len(extra) + 1):
            for more in itertools.combinations(extra, size):
                wider = dataclasses.replace(job, options={
                    **job.options, option.name: option.check(values + list(more))})
                key = wider.key(plan.identity or {}, __version__, inputs=inputs,
                                task_data=self.task_data)
                if (key not in self.fresh) if self.force else not self.stored(key, wider):
                    continue
                result = spec.narrow(self.store.get(key).load(), values)
                self.store.put(self.keys[i], _manifest(
                    job, plan.entry, plan.identity or {}, "driver", 0.0, list(inputs.values()),
                    {"narrowed_from": key, "host": socket.gethostname()}),
                    _result_files(result))
                return True
        return False

    def ready(self, i: int) -> bool:
        """All inputs of job ``i`` are stored."""
        return all(self.rows[d]["status"] in ("cached", "computed")
                   for d in self.deps[i].values())

    def wider_pending(self, i: int) -> bool:
        """Another job of this run computes a wider result that answers job ``i`` (a scan
        of more scores): wait for it rather than compute twice."""
        job = self.jobs[i]
        name = job.record().narrow_option
        if name is None:
            return False
        mine = set(job.options[name])
        rest = {k: v for k, v in job.key_options().items() if k != name}
        for j, other in enumerate(self.jobs):
            if (j != i and self.rows[j]["status"] == "pending" and other.model == job.model
                    and other.analysis == job.analysis and other.seed == job.seed
                    and other.task == job.task and other.shots == job.shots
                    and set(other.options[name]) > mine
                    and {k: v for k, v in other.key_options().items() if k != name} == rest):
                return True
        return False

    def runnable(self, plan: _ModelPlan) -> list[int]:
        """The plan's jobs that can start now: pending, computed by this plan, not started,
        inputs stored, no wider job of this run pending."""
        return [i for i in plan.jobs
                if self.rows[i]["status"] == "pending" and not self.submitted[i]
                and self.keys[i] is not None and self.owner.get(self.keys[i]) == i
                and self.ready(i) and not self.wider_pending(i)]

    def schedule(self) -> None:
        """Start what can start: derived jobs on this process, model jobs on their open
        workers. Re-entrant calls (a derived job finishing) only ask for another pass, so the
        stack stays flat however many jobs finish."""
        if self.scheduling:
            self.again = True
            return
        self.scheduling = True
        try:
            self.again = True
            while self.again:
                self.again = False
                for plan in self.plans.values():
                    if plan.identity is None:
                        continue
                    for i in self.runnable(plan):
                        if self.narrowed(plan, i):  # a wider result was computed meanwhile
                            self.done_key(i, cached=True)
                        elif not self.jobs[i].record().needs_model:
                            self.submitted[i] = True
                            self.derive(plan, i)
                        elif plan.worker is not None:
                            self.submitted[i] = True
                            self.call("run", plan, i)
        finally:
            self.scheduling = False

    def put(self, i: int, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        key = self.keys[i]
        assert key is not None
        self.store.put(key, manifest, files, replace=self.force)
        self.fresh.add(key)

    def derive(self, plan: _ModelPlan, i: int) -> None:
        """Compute a job that needs no model (``overlap``, ``report``) on this process."""
        job = self.jobs[i]
        start = time.perf_counter()
        try:
            loaded = {name: self.store.get(self.keys[d]).load()
                      for name, d in self.deps[i].items()}
            files = _result_files(compute(job, model=None, tasks=self.tasks, inputs=loaded,
                                          provenance=self.provenance(i)))
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            log.info("%s failed", job.describe(), exc_info=True)
            self.summary.exceptions.setdefault(job.describe(), err)
            self.done_key(i, error=f"{type(err).__name__}: {err}")
            return
        seconds = round(time.perf_counter() - start, 3)
        inputs = [self.keys[d] for d in self.deps[i].values()]
        self.put(i, _manifest(job, plan.entry, plan.identity or {}, "driver", seconds, inputs,
                              {"host": socket.gethostname()}), files)
        self.done_key(i, seconds=seconds)

    def done_key(self, i: int, *, seconds: float | None = None, error: str | None = None,
                 cached: bool = False) -> None:
        """Job ``i`` finished (or failed); so did the jobs of other models with its key; jobs
        that read it may now be ready."""
        k = self.keys[i]
        self.finish(i, "failed" if error else "cached" if cached else "computed", seconds,
                    error)
        for j in self.in_flight.pop(k, []):
            if error:
                self.finish(j, "failed", error=f"the same job (same key) on "
                            f"{self.jobs[i].model} failed: {error}")
            else:
                self.finish(j, "cached")
        self.schedule()

    def input_files(self, i: int) -> dict[str, dict[str, bytes]]:
        return {name: self.store.get(self.keys[d]).files() for name, d in self.deps[i].items()}

    def provenance(self, i: int) -> dict[str, dict[str, Any]]:
        """Where each input of job ``i`` came from: its job, key and the seconds it took."""
        out = {}
        for name, d in self.deps[i].items():
            manifest = self.store.get(self.keys[d]).manifest
            out[name] = {"key": self.keys[d], "job": self.jobs[d].to_dict(),
                         "seconds": manifest.get("seconds"), "analysis": self.jobs[d].analysis}
        return out

    # ---- workers ----------------------------------------------------------------------------

    def call(self, kind: str, plan: _ModelPlan, i: int | None = None) -> None:
        args: tuple = ()
        if i is not None:
            job = self.jobs[i]
            try:  # inputs verified at the start can still be damaged during the run
                args = (job.to_dict(), {t: self.tasks[t] for t in job.task_names()},
                        self.input_files(i), self.provenance(i))
            except ResultError as err:
                log.warning("%s: an input is not intact: %s", job.describe(), err)
                self.summary.exceptions.setdefault(job.describe(), err)
                self.done_key(i, error=f"ResultError: {err}")
                return
        future = self.executor.submit(plan.worker, kind, *args)
        plan.outstanding += 1
        self.active[future] = (kind, plan, i)

    def has_work(self, plan: _ModelPlan) -> bool:
        """The plan's model must be loaded: to learn its identity, or to run a job now."""
        return plan.identity is None or any(
            self.jobs[i].record().needs_model for i in self.runnable(plan))

    def has_pending(self, plan: _ModelPlan) -> bool:
        return any(self.rows[i]["status"] == "pending" and self.jobs[i].record().needs_model
                   and self.owner.get(self.keys[i]) == i for i in plan.jobs)

    def open_next(self) -> None:
        """Open models that have work, as many as the executor runs at once; a model whose
        jobs wait for another model's results stays queued."""
        for _ in range(len(self.waiting)):
            if len(self.open) >= self.executor.slots:
                return
            plan = self.waiting.popleft()
            if not self.has_work(plan):
                self.waiting.append(plan)
                continue
            plan.worker = self.executor.open(plan.entry)
            self.open.append(plan)
            if plan.identity is None:
                self.call("identity", plan)
            else:
                self.schedule()

    def close_idle(self, plan: _ModelPlan) -> None:
        """Release a model with nothing running and nothing to start (queued again if it
        still has jobs waiting for other models' results)."""
        if plan.outstanding or plan not in self.open or self.has_work(plan):
            return
        self.executor.close(plan.worker)
        plan.worker = None
        self.open.remove(plan)
        if self.has_pending(plan) and plan not in self.waiting:
            self.waiting.append(plan)

    def on_result(self, kind: str, plan: _ModelPlan, i: int | None, value: Any) -> None:
        if kind == "identity":
            plan.identity = value
            if plan.fingerprint:
                self.store.remember_identity(plan.fingerprint, value)
            self.assign_keys(plan)
            self.schedule()
            return
        assert i is not None
        job = self.jobs[i]
        extra = {k: value.get(k) for k in ("batch_tokens", *_PASS_TOKENS_KEYS.values(), "device",
                                           "threads", "host", "linear_kernel")}
        inputs = [self.keys[d] for d in self.deps[i].values()]
        self.put(i, _manifest(job, plan.entry, plan.identity or {}, self.executor.name,
                              value["seconds"], inputs, extra), value["files"])
        self.done_key(i, seconds=value["seconds"])

    def on_error(self, kind: str, plan: _ModelPlan, i: int | None, err: Exception) -> None:
        message = f"{type(err).__name__}: {err}"
        self.summary.exceptions.setdefault(
            self.jobs[i].describe() if i is not None else plan.entry.name, err)
        if kind == "identity":  # the model did not load: all its jobs fail
            log.info("model %s failed: %s", plan.entry.name, message)
            for j in plan.jobs:
                self.finish(j, "failed", error=message)
            return
        assert i is not None
        log.info("%s failed: %s", self.jobs[i].describe(), message)
        self.done_key(i, error=message)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> RunSummary:
        start = time.perf_counter()
        # Models whose identity is remembered: settle what is cached without loading them.
        loaded = getattr(self.executor, "models", {})
        for plan in self.plans.values():
            if plan.entry.name in loaded:  # given loaded: its identity is at hand
                plan.identity = _identity(loaded[plan.entry.name].info())
            else:
                plan.fingerprint = model_fingerprint(plan.entry)
            if plan.fingerprint:
                plan.identity = self.store.remembered_identity(plan.fingerprint)
            if plan.identity is not None:
                self.assign_keys(plan)
        self.schedule()  # derived jobs whose inputs are stored
        self.waiting.extend(p for p in self.plans.values()
                            if p.identity is None or self.has_pending(p))
        try:
            self.open_next()
            while self.active:
                for future in self.executor.wait(list(self.active)):
                    kind, plan, i = self.active.pop(future)
                    plan.outstanding -= 1
                    try:
                        value = self.executor.result(future)
                    except Exception as err:  # noqa: BLE001 - one job / model fails, not all
                        self.on_error(kind, plan, i, err)
                    else:
                        self.on_result(kind, plan, i, value)
                    for other in list(self.open):
                        self.close_idle(other)
                self.open_next()
        finally:
            for plan in list(self.open):
                self.executor.close(plan.worker)
            self.executor.shutdown()
            self.bar.close()
        for i, row in enumerate(self.rows):
            if row["status"] == "pending":  # cannot happen unless an input went missing
                self.finish(i, "failed", error="not run: its inputs never appeared")
        self.summary.jobs = self.rows
        self.summary.seconds = round(time.perf_counter() - start, 2)
        return self.summary


def job_keys(jobs: Sequence[Job], identity: Mapping[str, Any]) -> list[tuple[Job, str]]:
    """Every job of ``jobs`` and of what they read (as :func:`run_jobs` runs them) with its key
    for a model of ``identity`` (``weights_sha256``, ``tokenizer_sha256``)."""
    closure, deps, _ = _with_inputs(jobs)
    tasks = {name: task_digest(load_task(name))
             for name in sorted({t for job in closure for t in job.task_names()})}
    keys: list[str | None] = [None] * len(closure)
    return [(job, _key(i, closure, deps, keys, identity, tasks))
            for i, job in enumerate(closure)]


def _seed_index(folders: Sequence[str | os.PathLike[str]]
                ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """key -> (result folder, index entry), from the ``results/index.json`` of output and
    report folders."""
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in map(Path, folders):
        # the folder's own index, then those of its model folders (command-line outputs are
        # nested by model: OUT/<model>/results/index.json)
        nested = sorted(p.parent.parent for p in folder.glob(f"*/results/{INDEX_FILE}"))
        for base in [folder, *nested]:
            try:
                entries = read_index(base / "results")
            except ResultError as err:
                log.warning("ignoring %s", err)
                continue
            for name, entry in entries.items():
                if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                    out.setdefault(entry["key"], (base / "results" / name, entry))
    return out


def run_jobs(jobs: Sequence[Job], store: ResultStore | str | os.PathLike[str] | None = None,
             *, entries: Mapping[str, ModelEntry] | None = None, executor: str | Any = "local",
             progress: bool = True, executor_options: dict[str, Any] | None = None,
             seed_from: Sequence[str | os.PathLike[str]] = (), force: bool = False
             ) -> RunSummary:
    """Run every job (and every job they read) that is not in ``store`` yet.

    Each model's identity comes from the store (remembered by file fingerprint) or from
    loading it; jobs whose keys are stored are skipped; the rest run on the executor as soon
    as their inputs are stored and are committed one by one as they finish; jobs that need no
    model (``overlap``, ``report``) run on this process.

    Args:
        jobs: the jobs (e.g. :meth:`Grid.jobs`, or an analysis's :meth:`~Analysis.job`).
        store: a :class:`~mechicl.experiments.store.ResultStore` or its folder (default
            :func:`~mechicl.experiments.store.default_store`).
        entries: how to load each model, by the name the jobs use (default: the name is the
            spec, loaded with :func:`mechicl.load_model`'s defaults).
        executor: ``"local"``, ``"ray"`` or an executor object.
        progress: a tqdm bar over jobs.
        executor_options: keyword arguments of the executor class (e.g. Ray's ``address``).
        seed_from: output or report folders whose results (``results/index.json``) may be
            used instead of computing: copied into the store after their checksums are
            verified.
        force: compute every job again; each new result replaces the stored one when it is
            committed (a failed job leaves the old result in place).

    Returns:
        A :class:`RunSummary`: every job with its key and status (the jobs asked for first,
        then the inputs they read); failed jobs are listed in ``errors`` (the others still
        run).
    """
    store = as_store(store)
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; choose one of {sorted(EXECUTORS)}")
        executor = EXECUTORS[executor](**(executor_options or {}))
    elif executor_options:
        raise ValueError("executor_options only apply when the executor is given by name")
    store.clean_tmp()
    return _Run(jobs, dict(entries or {}), store, executor, progress, seed_from, force).run()


def run_grid(grid: Grid, store: ResultStore | str | os.PathLike[str] | None = None, *,
             executor: str | Any = "local", progress: bool = True,
             executor_options: dict[str, Any] | None = None) -> RunSummary:
    """Run every job of ``grid`` that is not in ``store`` yet (:func:`run_jobs`).

    Args:
        grid: a parsed grid (:func:`mechicl.experiments.grid.load_grid`).
        store, executor, progress, executor_options: as :func:`run_jobs`.
    """
    return run_jobs(grid.jobs(), store, entries={m: grid.entry(m) for m in grid.models},
                    executor=executor, progress=progress, executor_options=executor_options)


def job_result(store: ResultStore, summary: RunSummary, index: int) -> Any:
    """The loaded result of the ``index``-th job passed to :func:`run_jobs` (it must be cached
    or computed)."""
    row = summary.asked_rows()[index]
    if row["status"] not in ("cached", "computed"):
        raise ValueError(f"job {index} ({row['analysis']}) has no result: {row['status']}")
    return store.get(row["key"]).load()


# --------------------------------------------------------------------------------------------
# Results of a grid
# --------------------------------------------------------------------------------------------


def grid_results(grid: Grid, store: ResultStore, summary: RunSummary,
                 analyses: Iterable[str] | None = None) -> list[tuple[Job, Any]]:
    """(job, loaded result) for the grid's finished jobs (optionally only some analyses)."""
    wanted = set(analyses) if analyses is not None else None
    out = []
    for job, row in zip(grid.jobs(), summary.asked_rows(), strict=True):
        if row["key"] and row["status"] in ("cached", "computed") and (
                wanted is None or job.analysis in wanted):
            out.append((job, store.get(row["key"]).load()))
    return out


def sweep_tables(grid: Grid, store: ResultStore, summary: RunSummary) -> dict[str, pd.DataFrame]:
    """Per checkpoint sweep of the grid: the long table of its scan scores across training
    steps (:func:`mechicl.experiments.checkpoints.checkpoint_table`; the first seed), with
    ``identical_to`` naming an earlier checkpoint with the same weights."""
    found: dict[str, dict[Checkpoint, list]] = {}
    for job, row in zip(grid.jobs(), summary.asked_rows(), strict=True):
        entry = grid.entry(job.model)
        if (entry.sweep is None or job.analysis != "scan" or job.seed != grid.seeds[0]
                or row["status"] not in ("cached", "computed")):
            continue
        checkpoint = Checkpoint(model=entry.spec, step=entry.step,
                                label=entry.name.split("@", 1)[1], load_kwargs=entry.load)
        found.setdefault(entry.sweep, {})[checkpoint] = list(
            store.get(row["key"]).load().scores.values())
    return {sweep: checkpoint_table(results) for sweep, results in found.items()}


def write_run_outputs(grid: Grid, store: ResultStore, summary: RunSummary,
                      out: str | os.PathLike[str], *, formats: Iterable[str] = ("png", "html")
                      ) -> Path:
    """Write into ``out``: ``jobs.csv`` (every job with its key and status) and, for each
    checkpoint sweep, ``checkpoints-<sweep>.csv`` (scan scores per step and head),
    ``checkpoints-<sweep>.json`` (groups of checkpoints with identical weights) and a figure
    of each score across training steps, ``checkpoints-<sweep>-<score>.*``. All atomic."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "jobs.csv", summary.table().to_csv(index=False))
    for sweep, table in sweep_tables(grid, store, summary).items():
        atomic_write_text(out / f"checkpoints-{sweep}.csv", table.to_csv(index=False))
        steps = table.drop_duplicates("label")
        groups: dict[str, list[str]] = {}
        for label, first in zip(steps.label, steps.identical_to, strict=True):
            if first is not None:
                groups.setdefault(first, [first]).append(label)
        atomic_write_text(out / f"checkpoints-{sweep}.json", json.dumps(
            {"steps": dict(zip(steps.label, steps.step.tolist(), strict=True)),
             "identical_weights": list(groups.values())}, indent=2))
        positive = steps.step[steps.step > 0]
        log_x = bool(len(positive) and positive.max() / positive.min() >= 100)
        for score, part in table.groupby("score", sort=False):
            fig = checkpoint_figure(part, log_x=log_x, title=f"{sweep}: {score} across training")
            save_figure(fig, out / f"checkpoints-{sweep}-{score}", list(formats))
    return out
