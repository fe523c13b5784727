"""Running experiment grids (:mod:`mechicl.grid`) into a content-addressed result store
(:mod:`mechicl.store`), on this machine or on a Ray cluster.

``run_grid(grid, store)`` expands the grid into jobs, finds each model's identity (weights and
tokenizer hashes; remembered per model file fingerprint so that a model whose jobs are all
finished is not even loaded), skips every job whose key is already in the store, and runs the
rest, committing each result atomically as it finishes. A run killed at any moment and
started again therefore computes exactly the missing jobs.

Executors:

- :class:`LocalExecutor` (the default): one model at a time in this process.
- :class:`RayExecutor`: one Ray actor per model (each loads its model once and runs that
  model's jobs in order); actors run in parallel as the cluster's resources allow. Results
  come back to the driver as bytes and are committed to the driver's store, so the workers
  need no shared file system. Ray is the existing engine for this: ``ray.init(address=...)``
  connects to a cluster.

Derived analyses (``overlap``) need no model: the driver computes them from the stored
results of their inputs as soon as those exist.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from mechicl.grid import ANALYSES, Grid, Job, ModelEntry, task_digest
from mechicl.store import ResultStore, StoredResult, default_store
from mechicl.tasks import Task, load_task

__all__ = ["EXECUTORS", "LocalExecutor", "ModelWorker", "RayExecutor", "RunSummary",
           "grid_results", "load_result", "model_fingerprint", "run_grid", "sweep_tables",
           "write_run_outputs"]

log = logging.getLogger(__name__)


def _version() -> str:
    import mechicl

    return mechicl.__version__


# --------------------------------------------------------------------------------------------
# The analyses: (model, job, batch_tokens) -> something with .save(path)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bundle:
    """Several named results saved as subfolders (a scan's scores, patching targets)."""

    parts: dict[str, Any]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, part in self.parts.items():
            part.save(path / name)


@dataclass(frozen=True)
class _Folder:
    """A result that is a whole folder written by a function (the report)."""

    write: Callable[[Path], Any]

    def save(self, path: Path) -> None:
        self.write(path)


def _batch(job: Job, batch_tokens: int | None) -> dict[str, int]:
    value = job.options.get("batch_tokens", batch_tokens)
    return {} if value is None else {"batch_tokens": int(value)}


def _scan(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> _Bundle:
    from mechicl.induction import SCORES, induction_scan

    o = job.options
    length = {} if "length" not in o else {"length": _FixedLength(o["length"])}
    result = induction_scan(model, scores=tuple(o.get("scores", SCORES)),
                            n_seeds=o.get("n_seeds", 100), seed=job.seed, progress=False,
                            **length, **_batch(job, batch_tokens))
    return _Bundle(dict(result.scores))


@dataclass(frozen=True)
class _FixedLength:
    """One sequence length for every scan seed (picklable, unlike a lambda)."""

    length: int

    def __call__(self, seed_index: int) -> int:
        return self.length


def _importance(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> Any:
    from mechicl.importance import head_importance

    o = job.options
    return head_importance(model, task, shots=job.shots, method=o.get("method", "bansal"),
                           n=o.get("n", 50), seed=job.seed,
                           token_normalization=o.get("token_normalization", "reference"),
                           **_batch(job, batch_tokens))


def _accuracy(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> Any:
    from mechicl.evaluation import evaluate

    o = job.options
    return evaluate(model, task, shots=job.shots, n=o.get("n", 50), seed=job.seed,
                    length_normalize=o.get("length_normalize", False),
                    **_batch(job, batch_tokens))


def _ffn_importance(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> Any:
    from mechicl.importance import ffn_importance

    o = job.options
    return ffn_importance(model, task, shots=job.shots, n=o.get("n", 50), seed=job.seed,
                          metric=o.get("metric", "accuracy"), **_batch(job, batch_tokens))


def _pruning(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> _Bundle:
    """Importance on the first ``n`` prompts, the pruning curve on the next ``eval_n``
    (:func:`mechicl.pruning.split_prompts`), against ``draws`` random rankings."""
    from mechicl.importance import head_importance
    from mechicl.pruning import DEFAULT_PERCENTS, prune_curve, split_prompts

    o = job.options
    rank, evaluation = split_prompts(task, shots=job.shots, n_rank=o.get("n", 50),
                                     n_eval=o.get("eval_n", 50), seed=job.seed)
    ranking = head_importance(model, task, shots=job.shots, prompts=rank,
                              method=o.get("method", "bansal"), **_batch(job, batch_tokens))
    curve = prune_curve(model, task, shots=job.shots, prompts=evaluation,
                        head_rankings={"same task": ranking},
                        head_percents=tuple(o.get("percents", DEFAULT_PERCENTS)),
                        random_draws=o.get("draws", 3), seed=job.seed,
                        **_batch(job, batch_tokens))
    return _Bundle({"curve": curve, "ranking": ranking})


def _patching(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> _Bundle:
    from mechicl.pairs import make_pairs
    from mechicl.patching import patch

    o = job.options
    pairs = make_pairs(o.get("prompts", "ioi"), model, n=o.get("n", 16), seed=job.seed)
    return _Bundle({target: patch(model, pairs, target=target, **_batch(job, batch_tokens))
                    for target in o.get("targets", ["head_out"])})


def _report_config(job: Job) -> Any:
    from mechicl.report import ReportConfig

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in job.options.items()
              if k not in ("_inputs",)}
    return ReportConfig(seed=job.seed, **fields)


def _report(model: Any, job: Job, task: Task | None, batch_tokens: int | None) -> _Folder:
    from mechicl.report import build_report

    config = _report_config(job)
    if batch_tokens is not None:  # from the memory budget: it covers head importance too
        config = dataclasses.replace(config, batch_tokens=batch_tokens,
                                     importance_batch_tokens=batch_tokens)
    return _Folder(lambda path: build_report(model, path, config, progress=False))


ANALYSIS_FUNCTIONS: dict[str, Callable[[Any, Job, Task | None, int | None], Any]] = {
    "scan": _scan, "importance": _importance, "accuracy": _accuracy,
    "ffn_importance": _ffn_importance, "pruning": _pruning, "patching": _patching,
    "report": _report,
}


def _budget_analysis(analysis: str) -> str:
    """Which memory model of :mod:`mechicl.memory` an analysis follows."""
    return {"scan": "scan", "importance": "importance", "pruning": "importance",
            "accuracy": "choices", "ffn_importance": "choices", "patching": "forward"}[analysis]


def _longest_sequence(model: Any, job: Job, task: Task | None) -> int:
    """The longest token sequence the job feeds the model (for memory budgets)."""
    from mechicl.memory import longest_prompt, longest_scan_sequence
    from mechicl.tasks import build_prompts

    o = job.options
    if job.analysis == "scan":
        return longest_scan_sequence(o.get("n_seeds", 100), length=o.get("length"))
    if task is None:
        return int(getattr(model.cfg, "n_ctx", 2048))
    return longest_prompt(model, build_prompts(task, shots=job.shots, seed=job.seed,
                                               n=o.get("n", 50) + o.get("eval_n", 0)))


def _budget_batch_tokens(model: Any, entry: ModelEntry, job: Job, task: Task | None
                         ) -> int | None:
    if entry.memory_budget is None or "batch_tokens" in job.options:
        return None
    from mechicl.memory import batch_tokens_for_budget

    if job.analysis == "report":  # runs several analyses: one batch size that fits them all
        from mechicl.report import fit_memory_budget

        fitted = fit_memory_budget(model, _report_config(job), entry.memory_budget)
        return min(fitted.batch_tokens, fitted.importance_batch_tokens)
    return batch_tokens_for_budget(model, entry.memory_budget,
                                   seq_len=_longest_sequence(model, job, task),
                                   analysis=_budget_analysis(job.analysis))


# --------------------------------------------------------------------------------------------
# Workers: load one model, run its jobs, return results as bytes
# --------------------------------------------------------------------------------------------


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


class ModelWorker:
    """Loads one grid model (lazily) and runs jobs on it; used in-process by
    :class:`LocalExecutor` and as a Ray actor by :class:`RayExecutor`.

    Args:
        entry: the model (``ModelEntry.to_dict()`` form, so that it crosses process borders).
        threads: torch intra-op threads (None: leave as is).
    """

    def __init__(self, entry: dict[str, Any], threads: int | None = None):
        self.entry = ModelEntry(**entry)
        self.threads = threads
        self._model: Any = None

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Use ``threads`` torch threads for the call, then restore the process's setting."""
        import torch

        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def model(self) -> Any:
        if self._model is None:
            from mechicl.models import load_model

            with self._threads():
                self._model = load_model(self.entry.spec, **self.entry.load)
        return self._model

    def identity(self) -> dict[str, Any]:
        """``{"weights_sha256", "tokenizer_sha256", "info"}`` of the loaded model."""
        model = self.model()
        with self._threads():
            info = model.info()
        return {"weights_sha256": info["weights_sha256"],
                "tokenizer_sha256": info["tokenizer_sha256"], "info": info}

    def run(self, job: dict[str, Any], tasks: dict[str, Task]) -> dict[str, Any]:
        """Run one job with the data of its tasks; returns ``{"files": {path: bytes},
        "seconds", "batch_tokens", "threads", "host"}``."""
        import torch

        from mechicl.tasks import TASKS, register_task

        for name, task in tasks.items():  # the report finds its tasks by name
            if name not in TASKS or task_digest(load_task(name)) != task_digest(task):
                register_task(name, lambda task=task: task, overwrite=True)
        model = self.model()
        job_obj = Job.from_dict(job)
        task = tasks.get(job_obj.task) if job_obj.task is not None else None
        batch_tokens = _budget_batch_tokens(model, self.entry, job_obj, task)
        start = time.perf_counter()
        with self._threads(), tempfile.TemporaryDirectory(prefix="mechicl-job-") as tmp:
            threads = torch.get_num_threads()
            result = ANALYSIS_FUNCTIONS[job_obj.analysis](model, job_obj, task, batch_tokens)
            result.save(Path(tmp) / "result")
            files = _read_tree(Path(tmp) / "result")
        return {"files": files, "seconds": round(time.perf_counter() - start, 3),
                "batch_tokens": batch_tokens, "threads": threads,
                "host": socket.gethostname()}


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


class Executor(Protocol):
    """What :func:`run_grid` needs of an executor: workers (one per model) whose calls return
    futures, and a way to wait for some of them."""

    name: str
    slots: int  # models worked on at once

    def open(self, entry: ModelEntry) -> Any: ...
    def submit(self, worker: Any, method: str, *args: Any) -> Any: ...
    def wait(self, futures: list[Any]) -> list[Any]: ...
    def result(self, future: Any) -> Any: ...
    def close(self, worker: Any) -> None: ...
    def shutdown(self) -> None: ...


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
    for (so every result is committed as soon as it exists)."""

    name = "local"
    slots = 1

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def open(self, entry: ModelEntry) -> ModelWorker:
        return ModelWorker(entry.to_dict(), threads=self.threads)

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
        worker._model = None

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
    from mechicl.models import BUILTIN_MODELS, cache_dir

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
        jobs: every job of the grid with its key (None if its model could not be loaded) and
            status: ``cached`` (found in the store), ``computed``, ``failed``.
        errors: job description -> error message.
        seconds: wall time.
        executor: the executor's name.
        store: the store's folder.
    """

    jobs: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    executor: str = "local"
    store: str = ""

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.jobs, columns=["analysis", "model", "task", "shots", "seed",
                                                "key", "status", "seconds"])

    @property
    def counts(self) -> dict[str, int]:
        out = {"cached": 0, "computed": 0, "failed": 0}
        for row in self.jobs:
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return not self.errors


def _manifest(job: Job, entry: ModelEntry, identity: dict[str, Any], executor: str,
              seconds: float, inputs: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    info = identity.get("info", {})
    return {
        "job": {k: v for k, v in job.to_dict().items()},
        "kind": job.analysis,
        "model": {"weights_sha256": identity["weights_sha256"],
                  "tokenizer_sha256": identity["tokenizer_sha256"],
                  **{k: info.get(k) for k in ("name", "hf_id", "source", "dtype", "shape",
                                                  "versions")}},
        "entry": entry.to_dict(), "inputs": inputs, "mechicl": _version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": seconds, "executor": executor, **extra,
    }


@dataclass
class _ModelPlan:
    """One model's part of a run: its jobs, identity, keys, and what is left to compute."""

    entry: ModelEntry
    jobs: list[int] = field(default_factory=list)  # indices into the grid's jobs
    identity: dict[str, Any] | None = None
    fingerprint: str | None = None
    keys: dict[tuple, str] = field(default_factory=dict)  # _job_id -> key of model jobs
    todo: list[int] = field(default_factory=list)  # model jobs not in the store
    worker: Any = None
    outstanding: int = 0  # calls submitted to the worker and not yet returned


class _GridRun:
    """The state of one :func:`run_grid` call (see there)."""

    def __init__(self, grid: Grid, store: ResultStore, executor: Any, progress: bool):
        from tqdm.auto import tqdm

        self.store, self.executor = store, executor
        self.version = _version()
        self.jobs = grid.jobs()
        # Workers get the tasks' data, not only their names: tasks registered in this process
        # (or edited) reach Ray workers, and the data's hash is part of every key.
        self.tasks = {name: load_task(name) for name in grid.tasks}
        self.task_data = {name: task_digest(task) for name, task in self.tasks.items()}
        self.rows = [{"analysis": j.analysis, "model": j.model, "task": j.task,
                      "shots": j.shots, "seed": j.seed, "key": None, "status": "pending",
                      "seconds": None} for j in self.jobs]
        self.summary = RunSummary(executor=executor.name, store=str(store.root))
        self.plans: dict[str, _ModelPlan] = {}
        for i, job in enumerate(self.jobs):
            self.plans.setdefault(job.model, _ModelPlan(grid.entry(job.model))).jobs.append(i)
        # key -> jobs of other models waiting for it: models with identical weights (e.g. two
        # checkpoints) share keys, and each key is computed once even when they run in parallel
        self.in_flight: dict[str, list[tuple[_ModelPlan, int]]] = {}
        self.waiting: deque[_ModelPlan] = deque()
        self.open: list[_ModelPlan] = []
        self.active: dict[Any, tuple[str, _ModelPlan, int | None]] = {}  # future -> call
        self.bar = tqdm(total=len(self.jobs), desc="jobs", disable=not progress, unit="job")

    # ---- bookkeeping ------------------------------------------------------------------------

    def finish(self, i: int, state: str, seconds: float | None = None,
               error: str | None = None) -> None:
        self.rows[i] |= {"status": state, "seconds": seconds}
        if error is not None:
            self.summary.errors[self.jobs[i].describe()] = error
        self.bar.update(1)

    def assign_keys(self, plan: _ModelPlan) -> None:
        """Keys of the plan's model jobs; the cached ones are settled, the rest become
        ``plan.todo``; derived jobs whose inputs exist are computed."""
        plan.todo = []
        for i in plan.jobs:
            job = self.jobs[i]
            if not ANALYSES[job.analysis].needs_model:
                continue
            key = job.key(plan.identity, self.version, task_data=self.task_data)
            plan.keys[_job_id(job)] = key
            self.rows[i]["key"] = key
            if self.store.has(key):
                self.finish(i, "cached")
            elif key in self.in_flight:  # another model with the same weights computes it
                self.in_flight[key].append((plan, i))
            else:
                self.in_flight[key] = []
                plan.todo.append(i)
        self.settle_derived(plan)

    def settle_derived(self, plan: _ModelPlan) -> None:
        """Compute (on the driver) the derived jobs whose inputs are all stored; fail those
        with a failed input."""
        failed = {r["key"] for r in self.rows if r["status"] == "failed" and r["key"]}
        for i in plan.jobs:
            job = self.jobs[i]
            if ANALYSES[job.analysis].needs_model or self.rows[i]["status"] != "pending":
                continue
            inputs = [plan.keys.get(_job_id(j)) for j in job.inputs()]
            if any(k in failed for k in inputs):
                self.finish(i, "failed", error="an input failed")
                continue
            if any(k is None or not self.store.has(k) for k in inputs):
                continue
            key = job.key(plan.identity, self.version, inputs=inputs, task_data=self.task_data)
            self.rows[i]["key"] = key
            if self.store.has(key):
                self.finish(i, "cached")
                continue
            start = time.perf_counter()
            try:
                files = _derive(self.store, job, inputs)
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                log.exception("%s failed", job.describe())
                self.finish(i, "failed", error=f"{type(err).__name__}: {err}")
                continue
            seconds = round(time.perf_counter() - start, 3)
            self.store.put(key, _manifest(job, plan.entry, plan.identity, "driver", seconds,
                                          inputs, {"host": socket.gethostname()}), files)
            self.finish(i, "computed", seconds)

    # ---- workers ----------------------------------------------------------------------------

    def call(self, kind: str, plan: _ModelPlan, i: int | None = None) -> None:
        args = ()
        if i is not None:
            job = self.jobs[i]
            args = (job.to_dict(), {t: self.tasks[t] for t in job.task_names()})
        future = self.executor.submit(plan.worker, kind, *args)
        plan.outstanding += 1
        self.active[future] = (kind, plan, i)

    def open_next(self) -> None:
        while self.waiting and len(self.open) < self.executor.slots:
            plan = self.waiting.popleft()
            plan.worker = self.executor.open(plan.entry)
            self.open.append(plan)
            if plan.identity is None:
                self.call("identity", plan)
            for i in plan.todo:
                self.call("run", plan, i)

    def close_idle(self, plan: _ModelPlan) -> None:
        if plan.outstanding == 0 and plan in self.open:
            self.executor.close(plan.worker)
            plan.worker = None
            self.open.remove(plan)

    def on_result(self, kind: str, plan: _ModelPlan, i: int | None, value: Any) -> None:
        if kind == "identity":
            plan.identity = value
            if plan.fingerprint:
                self.store.remember_identity(plan.fingerprint, value)
            self.assign_keys(plan)
            for j in plan.todo:
                self.call("run", plan, j)
            return
        job = self.jobs[i]
        extra = {k: value[k] for k in ("batch_tokens", "threads", "host")}
        self.store.put(self.rows[i]["key"], _manifest(
            job, plan.entry, plan.identity, self.executor.name, value["seconds"], [], extra),
            value["files"])
        self.finish(i, "computed", value["seconds"])
        self.settle_derived(plan)
        for other, j in self.in_flight.pop(self.rows[i]["key"], []):
            self.finish(j, "cached")
            self.settle_derived(other)

    def on_error(self, kind: str, plan: _ModelPlan, i: int | None, err: Exception) -> None:
        message = f"{type(err).__name__}: {err}"
        if kind == "identity":  # the model did not load: all its jobs fail
            log.error("model %s failed: %s", plan.entry.name, message)
            for j in plan.jobs:
                if self.rows[j]["status"] == "pending":
                    self.finish(j, "failed", error=message)
            return
        log.error("%s failed: %s", self.jobs[i].describe(), message)
        self.finish(i, "failed", error=message)
        self.settle_derived(plan)
        for other, j in self.in_flight.pop(self.rows[i]["key"], []):
            self.finish(j, "failed", error=f"the same job (same key) on {plan.entry.name} "
                        f"failed: {message}")
            self.settle_derived(other)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> RunSummary:
        start = time.perf_counter()
        # Models whose identity is remembered: settle what is cached without loading them.
        for plan in self.plans.values():
            plan.fingerprint = model_fingerprint(plan.entry)
            if plan.fingerprint:
                plan.identity = self.store.remembered_identity(plan.fingerprint)
            if plan.identity is not None:
                self.assign_keys(plan)
                if not plan.todo:
                    continue
            self.waiting.append(plan)
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
                    self.close_idle(plan)
                self.open_next()
        finally:
            for plan in list(self.open):
                self.executor.close(plan.worker)
            self.executor.shutdown()
            self.bar.close()
        for i, row in enumerate(self.rows):
            if row["status"] == "pending":  # cannot happen unless a derived input went missing
                self.finish(i, "failed", error="not run: its inputs never appeared")
        self.summary.jobs = self.rows
        self.summary.seconds = round(time.perf_counter() - start, 2)
        return self.summary


def run_grid(grid: Grid, store: ResultStore | str | os.PathLike[str] | None = None, *,
             executor: str | Any = "local", progress: bool = True,
             executor_options: dict[str, Any] | None = None) -> RunSummary:
    """Run every job of ``grid`` that is not in ``store`` yet.

    Each model's identity comes from the store (remembered by file fingerprint) or from
    loading it; jobs whose keys are stored are skipped; the rest run on the executor and are
    committed one by one as they finish; derived jobs (``overlap``) are computed on this
    process as soon as their inputs are stored.

    Args:
        grid: a parsed grid (:func:`mechicl.grid.load_grid`).
        store: a :class:`~mechicl.store.ResultStore` or its folder (default
            :func:`~mechicl.store.default_store`).
        executor: ``"local"``, ``"ray"`` or an executor object.
        progress: a tqdm bar over jobs.
        executor_options: keyword arguments of the executor class (e.g. Ray's ``address``).

    Returns:
        A :class:`RunSummary`; failed jobs are listed in ``errors`` (the others still run).
    """
    store = store if isinstance(store, ResultStore) else ResultStore(store or default_store())
    if isinstance(executor, str):
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; choose one of {sorted(EXECUTORS)}")
        executor = EXECUTORS[executor](**(executor_options or {}))
    elif executor_options:
        raise ValueError("executor_options only apply when the executor is given by name")
    store.clean_tmp()
    return _GridRun(grid, store, executor, progress).run()


def _job_id(job: Job) -> tuple:
    return (job.analysis, job.model, job.task, job.shots, job.seed)


# --------------------------------------------------------------------------------------------
# Derived analyses and loading results
# --------------------------------------------------------------------------------------------


def _derive(store: ResultStore, job: Job, inputs: list[str]) -> dict[str, bytes]:
    """``overlap``: the scan's scores against the importance map (:func:`overlap_table`)."""
    from mechicl.overlap import overlap_table, top_k

    scan, importance = (load_result(store.get(k)) for k in inputs)
    o = job.options
    k = top_k(importance.mean.numel(), percentile=o.get("top_k_percent", 10))
    table = overlap_table({(job.task, job.shots): importance}, scan, k=k,
                          n_permutations=o.get("n_permutations", 1000), seed=job.seed)
    with tempfile.TemporaryDirectory(prefix="mechicl-derive-") as tmp:
        path = Path(tmp) / "overlap.parquet"
        table.to_parquet(path, index=False)
        return {"overlap.parquet": path.read_bytes()}


def load_result(stored: StoredResult) -> Any:
    """The Python object of a stored result: scan -> ``{score: HeadScores}``, importance ->
    HeadScores, accuracy -> EvalResult, ffn_importance -> LayerScores, pruning ->
    ``{"curve": PruneCurve, "ranking": HeadScores}``, patching -> ``{target: PatchResult}``,
    overlap -> DataFrame, report -> the report folder's path."""
    from mechicl.evaluation import EvalResult
    from mechicl.patching import PatchResult
    from mechicl.pruning import PruneCurve
    from mechicl.results import HeadScores, LayerScores

    kind = stored.manifest["kind"]
    root = stored.result_path
    if kind == "scan":
        return {p.name: HeadScores.load(p) for p in sorted(root.iterdir())}
    if kind == "importance":
        return HeadScores.load(root)
    if kind == "accuracy":
        return EvalResult.load(root)
    if kind == "ffn_importance":
        return LayerScores.load(root)
    if kind == "pruning":
        return {"curve": PruneCurve.load(root / "curve"),
                "ranking": HeadScores.load(root / "ranking")}
    if kind == "patching":
        return {p.name: PatchResult.load(p) for p in sorted(root.iterdir())}
    if kind == "overlap":
        return pd.read_parquet(root / "overlap.parquet")
    if kind == "report":
        return root
    raise ValueError(f"{stored.path}: unknown result kind {kind!r}")


def grid_results(grid: Grid, store: ResultStore, summary: RunSummary,
                 analyses: Iterable[str] | None = None) -> list[tuple[Job, Any]]:
    """(job, loaded result) for the grid's finished jobs (optionally only some analyses)."""
    wanted = set(analyses) if analyses is not None else None
    out = []
    for job, row in zip(grid.jobs(), summary.jobs, strict=True):
        if row["key"] and row["status"] in ("cached", "computed") and (
                wanted is None or job.analysis in wanted):
            out.append((job, load_result(store.get(row["key"]))))
    return out


def sweep_tables(grid: Grid, store: ResultStore, summary: RunSummary) -> dict[str, pd.DataFrame]:
    """Per checkpoint sweep of the grid: the long table of its scan scores across training
    steps (:func:`mechicl.checkpoints.checkpoint_table`; the first seed), with
    ``identical_to`` naming an earlier checkpoint with the same weights."""
    from mechicl.checkpoints import Checkpoint, checkpoint_table

    found: dict[str, dict[Checkpoint, list]] = {}
    for job, row in zip(grid.jobs(), summary.jobs, strict=True):
        entry = grid.entry(job.model)
        if (entry.sweep is None or job.analysis != "scan" or job.seed != grid.seeds[0]
                or row["status"] not in ("cached", "computed")):
            continue
        checkpoint = Checkpoint(model=entry.spec, step=entry.step,
                                label=entry.name.split("@", 1)[1], load_kwargs=entry.load)
        found.setdefault(entry.sweep, {})[checkpoint] = list(
            load_result(store.get(row["key"])).values())
    return {sweep: checkpoint_table(results) for sweep, results in found.items()}


def write_run_outputs(grid: Grid, store: ResultStore, summary: RunSummary,
                      out: str | os.PathLike[str], *, formats: Iterable[str] = ("png", "html")
                      ) -> Path:
    """Write into ``out``: ``jobs.csv`` (every job with its key and status) and, for each
    checkpoint sweep, ``checkpoints-<sweep>.csv`` (scan scores per step and head),
    ``checkpoints-<sweep>.json`` (groups of checkpoints with identical weights) and a figure
    of each score across training steps, ``checkpoints-<sweep>-<score>.*``. All atomic."""
    from mechicl._io import atomic_write_text
    from mechicl.plotting import checkpoint_figure, save_figure

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
