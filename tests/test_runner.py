"""Running grids (issue 8): the content-addressed store, resuming after kill -9, cache keys
that change with weights / config / task data and only then, results equal to calling the
library directly, the Ray executor equal to the local one, and the CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechicl
from mechicl.analyses.overlap import overlap_table, top_k
from mechicl.experiments.grid import parse_grid, task_digest
from mechicl.experiments.runner import grid_results, run_grid
from mechicl.experiments.store import ResultStore
from mechicl.inputs.tasks import TASKS, load_task

sys.path.insert(0, str(Path(__file__).parent))
import reference_importance as ref  # noqa: E402

TASK_A, TASK_B = "runner_copy_a", "runner_copy_b"
REGISTER = textwrap.dedent(f"""
    import dataclasses, sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import reference_importance as ref
    from mechicl.inputs.tasks import TASKS, register_task
    for i, name in enumerate(({TASK_A!r}, {TASK_B!r})):
        if name not in TASKS:
            register_task(name, lambda name=name, i=i: dataclasses.replace(
                ref.copy_task(40, seed=i), name=name))
""")
exec(REGISTER)  # the same registration in this process and in the subprocesses


def grid_dict(model: str | Path, **analyses: dict) -> dict:
    return {"grid": {"models": [str(model)], "tasks": [TASK_A, TASK_B], "shots": [0, 1],
                     "seeds": [0]},
            "analyses": analyses or {
                "scan": {"n_seeds": 3, "length": 8, "scores": ["prefix_matching", "copying"]},
                "importance": {"n": 6}, "accuracy": {"n": 6},
                "overlap": {"n_permutations": 20}}}


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    """One uninterrupted run of the default test grid (one torch thread)."""
    store = ResultStore(tmp_path_factory.mktemp("store"))
    summary = run_grid(parse_grid(grid_dict(tiny_folder)), store, progress=False,
                       executor_options={"threads": 1})
    return store, summary


def test_run_computes_every_job_once_and_reruns_from_the_store(finished, tiny_folder,
                                                              monkeypatch):
    store, summary = finished
    n_jobs = 1 + 3 * 4  # scan + (importance, accuracy, overlap) x 2 tasks x 2 shots
    assert summary.ok and summary.counts == {"cached": 0, "computed": n_jobs, "failed": 0}
    assert len(list(store.keys())) == n_jobs
    assert not any((store.root / "tmp").iterdir())
    table = summary.table()
    assert table.key.notna().all() and table.key.is_unique

    # Again: nothing recomputed, and the model is not even loaded (its identity is remembered
    # by file fingerprint).
    def no_loading(*args, **kwargs):
        raise AssertionError("a finished grid loaded its model")

    monkeypatch.setattr(mechicl.experiments.runner, "load_model", no_loading)
    again = run_grid(parse_grid(grid_dict(tiny_folder)), store, progress=False)
    assert again.counts == {"cached": n_jobs, "computed": 0, "failed": 0}
    assert again.table().key.tolist() == table.key.tolist()


def test_stored_results_equal_direct_library_calls(finished, tiny_folder, one_thread):
    store, summary = finished
    model = mechicl.load_model(tiny_folder)
    rows = {(r["analysis"], r["task"], r["shots"]): r["key"] for r in summary.jobs}
    scan = store.get(rows["scan", None, None]).load().scores
    direct = mechicl.induction_scan(model, scores=("prefix_matching", "copying"), n_seeds=3,
                                    seed=0, length=lambda s: 8, progress=False)
    for name in ("prefix_matching", "copying"):
        torch.testing.assert_close(scan[name].per_seed, direct.scores[name].per_seed,
                                   rtol=0, atol=0)
    imp = store.get(rows["importance", TASK_B, 1]).load()
    torch.testing.assert_close(imp.mean, mechicl.head_importance(
        model, TASK_B, shots=1, n=6, seed=0).mean, rtol=0, atol=0)
    acc = store.get(rows["accuracy", TASK_A, 0]).load()
    assert acc.accuracy == mechicl.evaluate(model, TASK_A, shots=0, n=6, seed=0).accuracy
    overlap = store.get(rows["overlap", TASK_B, 1]).load().data
    expected = overlap_table({(TASK_B, 1): imp}, scan, k=top_k(imp.mean.numel(), percentile=10),
                             n_permutations=20, seed=0)
    pd.testing.assert_frame_equal(overlap, expected)
    loaded = grid_results(parse_grid(grid_dict(tiny_folder)), store, summary, ["accuracy"])
    assert [(j.task, j.shots) for j, _ in loaded] == [(TASK_A, 0), (TASK_A, 1), (TASK_B, 0),
                                                      (TASK_B, 1)]
    assert loaded[0][1].accuracy == acc.accuracy
    manifest = store.get(rows["overlap", TASK_B, 1]).manifest
    assert manifest["inputs"] == [rows["scan", None, None], rows["importance", TASK_B, 1]]
    assert manifest["model"]["weights_sha256"] == model.weights_hash


def test_keys_change_with_weights_config_and_task_data_and_only_then(finished, tiny_folder,
                                                                      tmp_path):
    import shutil

    from mechicl.testing import tiny_hf_model

    reference, summary = finished
    store = ResultStore(shutil.copytree(reference.root, tmp_path / "store"))
    keys = dict(zip([(r["analysis"], r["task"], r["shots"]) for r in summary.jobs],
                    summary.table().key, strict=True))

    def rerun(data: dict) -> pd.DataFrame:
        out = run_grid(parse_grid(data), store, progress=False, executor_options={"threads": 1})
        assert out.ok
        return out.table()

    # A renamed copy of the same weights, and execution-only settings: all cached.
    copy = tmp_path / "renamed-copy"
    shutil.copytree(tiny_folder, copy)
    data = grid_dict(copy)
    data["analyses"]["importance"]["batch_tokens"] = 64
    table = rerun(data)
    assert (table.status == "cached").all() and table.key.tolist() == list(keys.values())

    # One option changed: that analysis (and what reads it) gets new keys, nothing else.
    data = grid_dict(tiny_folder)
    data["analyses"]["importance"]["n"] = 5
    table = rerun(data)
    changed = table[table.key != pd.Series(list(keys.values()))]
    assert set(changed.analysis) == {"importance", "overlap"}
    assert (changed.status == "computed").all()
    assert (table[~table.index.isin(changed.index)].status == "cached").all()

    # Different weights: every key changes.
    hf_model, tokenizer = tiny_hf_model("llama", seed=1)
    other = tmp_path / "other-weights"
    hf_model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    table = rerun(grid_dict(other, scan={"n_seeds": 3, "length": 8}))
    assert table.key.iloc[0] != keys["scan", None, None]

    # Edited task data under the same name: new keys for that task only.
    job = parse_grid(grid_dict(tiny_folder)).jobs()[1]
    ident = {"weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    base = {TASK_A: task_digest(load_task(TASK_A)), TASK_B: task_digest(load_task(TASK_B))}
    edited = dataclasses.replace(load_task(job.task), template="Q: {input}\nA:")
    assert job.key(ident, "0", task_data=base) != job.key(
        ident, "0", task_data={**base, job.task: task_digest(edited)})
    other_task = TASK_B if job.task == TASK_A else TASK_A
    assert job.key(ident, "0", task_data=base) == job.key(
        ident, "0", task_data={**base, other_task: task_digest(edited)})


def test_failed_jobs_are_reported_and_the_rest_finish(tiny_folder, tmp_path, monkeypatch):
    from mechicl.analyses import ANALYSES

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(ANALYSES, "importance", dataclasses.replace(ANALYSES["importance"],
                                                                    run=broken))
    store = ResultStore(tmp_path / "store")
    summary = run_grid(parse_grid(grid_dict(tiny_folder)), store, progress=False)
    assert summary.counts == {"cached": 0, "computed": 1 + 4, "failed": 4 + 4}
    assert all("boom" in e or "input failed" in e for e in summary.errors.values())
    assert set(store.table().analysis) == {"scan", "accuracy"}


def test_store_commits_atomically(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    key = "ab" * 32
    assert store.put(key, {"job": {}}, {"a.json": b"{}", "sub/b.bin": b"\x00"})
    assert store.has(key) and not store.put(key, {"job": {}}, {"a.json": b"other"})
    assert (store.path(key) / "result" / "a.json").read_bytes() == b"{}"
    assert store.contents() == {key: {"a.json": b"{}", "sub/b.bin": b"\x00"}}
    # a crash while writing leaves no result and nothing half-written in objects/
    other = "cd" * 32

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put(other, {"job": {}}, {"a.json": b"{}"})
    monkeypatch.undo()
    assert not store.has(other) and not store.path(other).exists()
    assert list(store.keys()) == [key]
    with pytest.raises(ValueError, match="escapes"):
        store.put("ef" * 32, {}, {"../x": b""})
    with pytest.raises(ValueError, match="not a job key"):
        store.path("nope")
    # leftovers of dead runs are removed, those of live runs kept
    import socket

    dead = store.root / "tmp" / f"{socket.gethostname()}.999999999.x"
    live = store.root / "tmp" / f"{socket.gethostname()}.{os.getppid()}.y"
    dead.mkdir(parents=True)
    live.mkdir()
    assert store.clean_tmp() == 1 and live.exists() and not dead.exists()


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    code = REGISTER + "\nfrom mechicl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.parametrize("kill_after", [0, 3])
def test_kill_9_then_resume_gives_identical_results(finished, tiny_folder, tmp_path,
                                                    kill_after):
    """A run killed with SIGKILL (at the first result's commit, or after a few) and started
    again ends with exactly the uninterrupted run's results: same keys, same bytes, no
    duplicates, no leftovers."""
    reference, ref_summary = finished
    grid = tmp_path / "grid.toml"
    grid.write_text(_toml(grid_dict(tiny_folder)))
    store = ResultStore(tmp_path / "store")
    args = ["run", str(grid), "--store", str(store.root), "--threads", "1", "--no-progress"]
    proc = _run_cli(args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(store.keys())) > kill_after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(store.keys()))
    assert 0 < done_before < len(ref_summary.jobs)
    resumed = _run_cli(args)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    n = len(ref_summary.jobs)
    assert f"{n - done_before} computed, {done_before} already in the store" in out
    assert store.contents() == reference.contents()
    assert not any((store.root / "tmp").iterdir())


def _toml(data: dict) -> str:
    lines = ["[grid]"]
    for k, v in data["grid"].items():
        lines.append(f"{k} = {json.dumps(v)}")
    for name, options in data["analyses"].items():
        lines.append(f"[analyses.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def test_ray_executor_equals_local(finished, tiny_folder, tmp_path):
    import ray  # in the test extra: a missing Ray fails here rather than skipping

    reference, ref_summary = finished
    store = ResultStore(tmp_path / "ray-store")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_grid(parse_grid(grid_dict(tiny_folder)), store, executor="ray",
                           executor_options={"threads": 1}, progress=False)
    finally:
        ray.shutdown()
    assert summary.ok and summary.executor == "ray"
    assert summary.table().key.tolist() == ref_summary.table().key.tolist()
    assert store.contents() == reference.contents()
    executors = {store.get(k).manifest["executor"] for k in store.keys()}
    assert executors == {"ray", "driver"}  # overlap is derived on the driver


def test_cli_run_and_runs(finished, tiny_folder, tmp_path, capsys):
    from mechicl.cli import main

    store, summary = finished
    grid = tmp_path / "grid.toml"
    grid.write_text(_toml(grid_dict(tiny_folder)))
    assert main(["run", str(grid), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"importance {tiny_folder} {TASK_A} 0-shot seed 0" in out and "13 jobs" in out
    assert main(["run", str(grid), "--store", str(store.root), "--no-progress",
                 "--out", str(tmp_path / "out")]) == 0
    assert "0 computed, 13 already in the store" in capsys.readouterr().out
    jobs = pd.read_csv(tmp_path / "out" / "jobs.csv")
    assert len(jobs) == 13 and (jobs.status == "cached").all()
    assert main(["runs", "--store", str(store.root), "--analysis", "overlap", "--csv"]) == 0
    listed = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert len(listed) == 4 and set(listed.analysis) == {"overlap"}
    key = summary.jobs[0]["key"]
    assert main(["runs", "--store", str(store.root), "--key", key[:10]]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["key"] == key and manifest["job"]["analysis"] == "scan"
    assert {"weights_sha256", "versions"} <= set(manifest["model"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nmodels = ['m']\n[analyses.scan]\nn_seed = 3\n")
    with pytest.raises(SystemExit, match=r"unknown option analyses.scan.n_seed"):
        main(["run", str(bad)])
    with pytest.raises(SystemExit, match="matches 0 results"):
        main(["runs", "--store", str(store.root), "--key", "zz"])


def test_registered_tasks_reach_workers(tiny_folder, monkeypatch):
    # the worker runs a job with the task data it was given, where its own registry differs,
    # and restores its registry after the job
    from mechicl.experiments import runner
    from mechicl.experiments.runner import ModelWorker

    task = dataclasses.replace(ref.copy_task(40, seed=7), name=TASK_A)
    assert task_digest(load_task(TASK_A)) != task_digest(task)
    seen, compute = [], runner.compute

    def spy(*args, **kwargs):
        seen.append(task_digest(load_task(TASK_A)))
        return compute(*args, **kwargs)

    monkeypatch.setattr(runner, "compute", spy)
    worker = ModelWorker({"name": "m", "spec": str(tiny_folder)}, threads=1)
    before = TASKS[TASK_A]
    out = worker.run({"analysis": "accuracy", "model": "m", "seed": 0, "task": TASK_A,
                      "shots": 0, "options": {"n": 4}}, {TASK_A: task})
    assert seen == [task_digest(task)] and TASKS[TASK_A] is before
    assert "predictions.parquet" in out["files"]


def test_checkpoint_sweep_runs_once_per_distinct_weights_and_plots(tmp_path):
    """A folder of local checkpoints in a grid: one model per checkpoint, identical weights
    share keys (computed once), and --out writes the score-vs-step table and figures."""
    from mechicl.cli import main
    from mechicl.testing import tiny_hf_model

    folder = tmp_path / "ckpts"
    for name, seed in {"step0": 0, "step-100": 1, "checkpoint-200": 1, "300": 2}.items():
        hf_model, tokenizer = tiny_hf_model("llama", seed=seed, n_layers=2, d_model=32,
                                            n_ctx=64)
        hf_model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    grid = tmp_path / "sweep.toml"
    grid.write_text('[checkpoints.tiny]\nfolder = "ckpts"\n[grid]\nseeds = [0]\n'
                    '[analyses.scan]\nn_seeds = 2\nlength = 6\n'
                    'scores = ["prefix_matching", "previous_token"]\n')
    parsed = mechicl.experiments.grid.load_grid(grid)
    assert parsed.models == ("tiny@step0", "tiny@step-100", "tiny@checkpoint-200", "tiny@300")
    assert [parsed.entry(m).step for m in parsed.models] == [0, 100, 200, 300]
    store = tmp_path / "store"
    assert main(["run", str(grid), "--store", str(store), "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "out"), "--formats", "html"]) == 0
    jobs = pd.read_csv(tmp_path / "out" / "jobs.csv")
    assert jobs.key.nunique() == 3  # step-100 and checkpoint-200 are the same weights
    assert jobs.status.tolist() == ["computed", "computed", "cached", "computed"]
    info = json.loads((tmp_path / "out" / "checkpoints-tiny.json").read_text())
    assert info["identical_weights"] == [["step-100", "checkpoint-200"]]
    assert info["steps"] == {"step0": 0, "step-100": 100, "checkpoint-200": 200, "300": 300}
    table = pd.read_csv(tmp_path / "out" / "checkpoints-tiny.csv")
    direct = mechicl.induction_scan(
        mechicl.load_model(folder / "300"), scores=("prefix_matching",), n_seeds=2, seed=0,
        length=lambda s: 6, progress=False).scores["prefix_matching"]
    last = table[(table.step == 300) & (table.score == "prefix_matching")]
    torch.testing.assert_close(torch.tensor(last["mean"].to_numpy()), direct.mean.flatten())
    for score in ("prefix_matching", "previous_token"):
        assert (tmp_path / "out" / f"checkpoints-tiny-{score}.html").is_file()

    # Again with other options (new keys), now with the checkpoints' identities remembered and
    # all models running at once on Ray: the identical checkpoint still computes nothing - its
    # job waits for the other's result - and its model is never loaded.
    import ray

    grid.write_text(grid.read_text().replace("n_seeds = 2", "n_seeds = 3"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        again = run_grid(mechicl.experiments.grid.load_grid(grid), ResultStore(store), executor="ray",
                         executor_options={"threads": 1}, progress=False)
    finally:
        ray.shutdown()
    assert again.ok and [r["status"] for r in again.jobs] == ["computed", "computed", "cached",
                                                              "computed"]
    assert again.jobs[1]["key"] == again.jobs[2]["key"]
    assert len(list(ResultStore(store).keys())) == 3 + 3


def test_model_load_options_reach_the_worker_and_the_key(tiny_folder, tmp_path):
    """[models.X] load options: a bfloat16 load is other weights (other keys) than float32;
    the manifest records the entry; bad options name the key."""
    data = grid_dict(tiny_folder, scan={"n_seeds": 2, "length": 6})
    data["models"] = {str(tiny_folder): {"dtype": "bfloat16"}}
    store = ResultStore(tmp_path / "store")
    half = run_grid(parse_grid(data), store, progress=False)
    full = run_grid(parse_grid(grid_dict(tiny_folder, scan={"n_seeds": 2, "length": 6})), store,
                    progress=False)
    assert half.ok and full.ok and half.jobs[0]["key"] != full.jobs[0]["key"]
    manifest = store.get(half.jobs[0]["key"]).manifest
    assert manifest["entry"]["load"] == {"dtype": "bfloat16"}
    scores = store.get(half.jobs[0]["key"]).load().scores["prefix_matching"]
    assert scores.model["weights_sha256"] == manifest["model"]["weights_sha256"]
    for table, match in [({"dtype": "int8"}, r"models.*dtype = 'int8': choose one of"),
                         ({"n_devices": 0}, r"models.*: n_devices=0: need an integer >= 1"),
                         ({"device": "cpu", "device_map": "auto"}, "both given"),
                         ({"device_map": "auto", "max_memory": {"gpu0": "1GB"}},
                          r"max_memory key 'gpu0' is not a device"),
                         ({"device_map": "sideways"}, r"device_map='sideways' is neither"),
                         ({"cuda": True}, r"unknown key models.*cuda")]:
        with pytest.raises(mechicl.experiments.grid.GridError, match=match):
            parse_grid({**data, "models": {str(tiny_folder): table}})
    # a grid for a cluster parses on a machine without its GPUs
    parse_grid({**data, "models": {str(tiny_folder): {"n_devices": 8}}})
    with pytest.raises(mechicl.experiments.grid.GridError, match=r"is not in grid.models"):
        parse_grid({**data, "models": {"other": {}}})


def test_memory_budget_chooses_batch_tokens_without_changing_keys(tiny_folder, tmp_path,
                                                                  one_thread):
    """[models.X] memory_budget: each job's batch_tokens is the largest that fits the budget
    (recorded in the manifest); keys and results are those of the run without a budget."""
    from mechicl.experiments.memory import batch_tokens_for_budget, estimate_memory

    def longest(model, job, task):
        return job.record().sequence_length(model, job, task)

    analyses = {"scan": {"n_seeds": 3, "length": 8}, "importance": {"n": 6}}
    model = mechicl.load_model(tiny_folder)
    plain = parse_grid(grid_dict(tiny_folder, **analyses))
    seq_len, job = max(((longest(model, j, load_task(j.task)), j)
                        for j in plain.jobs() if j.analysis == "importance"),
                       key=lambda pair: pair[0])
    # A budget with room for exactly two of the longest rows of the importance jobs.
    two_rows = estimate_memory(model, batch_tokens=2 * seq_len, seq_len=seq_len,
                               analysis="importance").total
    data = grid_dict(tiny_folder, **analyses)
    data["models"] = {str(tiny_folder): {"memory_budget": two_rows}}
    store = ResultStore(tmp_path / "store")
    budgeted = run_grid(parse_grid(data), store, progress=False,
                        executor_options={"threads": 1})
    assert budgeted.ok
    for row in budgeted.jobs:
        j = next(j for j in plain.jobs() if (j.analysis, j.task, j.shots) ==
                 (row["analysis"], row["task"], row["shots"]))
        task = load_task(j.task) if j.task else None
        expected = batch_tokens_for_budget(
            model, two_rows, seq_len=longest(model, j, task),
            analysis="scan" if j.analysis == "scan" else "importance")
        assert store.get(row["key"]).manifest["batch_tokens"] == expected
        if j.analysis == "importance" and (j.task, j.shots) == (job.task, job.shots):
            assert expected == 2 * seq_len
    unbudgeted = run_grid(plain, ResultStore(tmp_path / "plain"), progress=False,
                          executor_options={"threads": 1})
    assert [r["key"] for r in budgeted.jobs] == [r["key"] for r in unbudgeted.jobs]
    for row in budgeted.jobs:
        if row["analysis"] == "importance":
            a = store.get(row["key"]).load()
            b = ResultStore(tmp_path / "plain").get(row["key"]).load()
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-6)
    with pytest.raises(mechicl.experiments.grid.GridError, match=r"memory_budget.*unknown unit"):
        parse_grid({**data, "models": {str(tiny_folder): {"memory_budget": "8 parsecs"}}})


def test_memory_budget_of_a_report_job_sizes_each_of_its_analyses(tiny_folder, tmp_path,
                                                                 one_thread):
    """A report job under a budget: its results are jobs of their own, each sized for the
    longest row it feeds the model (not the model's context, which no budget holds)."""
    from mechicl.analyses import Job
    from mechicl.analyses.evaluation import longest_prompt
    from mechicl.experiments.memory import batch_tokens_for_budget, estimate_memory
    from mechicl.inputs.tasks import build_prompts

    options = {"n": 6, "eval_n": 8, "scan_seeds": 3, "scan_length": 8, "prune_tasks": [TASK_A],
               "prune_shots": [1], "percents": [0, 50], "ffn_percents": [0, 50], "draws": 1,
               "n_permutations": 20, "n_resamples": 20, "causal_ks": [1, 2]}
    model = mechicl.load_model(tiny_folder)
    seq = max(longest_prompt(model, build_prompts(load_task(t), shots=s, n=6))
              for t in (TASK_A, TASK_B) for s in (0, 1))
    budget = estimate_memory(model, batch_tokens=2 * seq, seq_len=seq, analysis="importance").total
    with pytest.raises(ValueError, match="too small"):  # what sizing for the context gave
        batch_tokens_for_budget(model, budget, seq_len=model.n_ctx, analysis="importance")
    data = grid_dict(tiny_folder, report=options)
    data["models"] = {str(tiny_folder): {"memory_budget": budget}}
    store = ResultStore(tmp_path / "store")
    summary = run_grid(parse_grid(data), store, progress=False, executor_options={"threads": 1})
    assert summary.ok, summary.table().to_string()
    assert [r["analysis"] for r in summary.jobs if r["asked"]] == ["report"]
    importance = []
    for row in summary.jobs:
        entry = store.get(row["key"])
        job = Job.from_dict(entry.manifest["job"])
        kind = job.record().memory_model(job)
        if kind is None or "narrowed_from" in entry.manifest:
            continue
        task = load_task(job.task) if job.task else None
        assert entry.manifest["batch_tokens"] == batch_tokens_for_budget(
            model, budget, seq_len=job.record().sequence_length(model, job, task),
            analysis=kind), job.describe()
        if job.analysis == "importance":
            importance.append(entry.manifest["batch_tokens"])
    assert len(importance) == 4 + 5 and 2 * seq in importance  # + the compared methods


# ---- regressions found in review --------------------------------------------------------------


def test_asked_jobs_come_first_and_results_match_their_jobs(tiny_folder, tmp_path):
    """Jobs with inputs before jobs without: every asked job runs and grid_results pairs each
    job with its own result (positions once shifted when inputs came between asked jobs)."""
    from mechicl.analyses import ANALYSES

    data = {"grid": {"models": [str(tiny_folder)], "tasks": [TASK_A], "shots": [1],
                     "seeds": [0]},
            "analyses": {"pruning": {"n": 4, "eval_n": 4, "percents": [0, 50], "draws": 1},
                         "scan": {"n_seeds": 2, "length": 6}}}
    grid = parse_grid(data)
    store = ResultStore(tmp_path / "store")
    summary = run_grid(grid, store, progress=False, executor_options={"threads": 1})
    assert summary.ok
    asked = summary.asked_rows()
    assert [r["analysis"] for r in asked] == [j.analysis for j in grid.jobs()]
    assert all(r["asked"] and r["status"] == "computed" for r in asked)
    assert {r["analysis"] for r in summary.jobs if not r["asked"]} == {"importance"}
    for job, result in grid_results(grid, store, summary):
        assert isinstance(result, ANALYSES[job.analysis].result_type), job.describe()


def test_a_jobs_key_does_not_depend_on_the_rest_of_the_run():
    from mechicl.analyses import ANALYSES

    ident = {"weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    scan = ANALYSES["scan"].job("m")
    assert scan.key(ident, "v") == scan.key(ident, "v", task_data={TASK_A: "d" * 64})
    report = ANALYSES["report"].job("m")
    # tasks=None: the shipped tasks, whose data its inputs' keys hold; the pruning tasks it
    # names (an option naming tasks) are its own
    assert report.task_names() == ["country_capital", "antonyms"]
    sparsity = ANALYSES["sparsity_curves"].job("m", {"recall_tasks": ["country_capital:0"],
                                                     "icl_tasks": ["sentiment_unrelated:8"]})
    assert sparsity.task_names() == ["country_capital", "sentiment_unrelated"]


def test_many_derived_jobs_finish_without_deep_recursion(tmp_path):
    """Derived jobs that are ready at once are computed in one flat pass (the scheduler used to
    recurse once per job)."""
    from mechicl.analyses import ANALYSES, Analysis, Option, register_analysis
    from mechicl.results import LayerScores

    spec = register_analysis(Analysis(
        name="probe_derived", help="a derived test analysis", memory=None, needs_model=False,
        run=lambda call: LayerScores.from_per_seed(
            "probe", torch.full((1, 2), float(call.options["i"]))),
        result_type=LayerScores,
        options=(Option(name="i", type=int, default=0, help="which"),)))
    try:
        jobs = [spec.job("m", {"i": i}) for i in range(400)]
        import mechicl.experiments.runner as runner

        run = runner._Run(jobs, {}, ResultStore(tmp_path / "s"), runner.LocalExecutor(),
                          progress=False)
        for plan in run.plans.values():  # the model's identity, as if remembered
            plan.identity = {"weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
            run.assign_keys(plan)
        summary = run.run()
        assert summary.counts["computed"] == 400
    finally:
        del ANALYSES["probe_derived"]


def test_force_replaces_a_result_only_once_the_new_one_exists(tmp_path):
    store = ResultStore(tmp_path)
    key = "ab" * 32
    store.put(key, {"job": {}}, {"a": b"old"})
    assert not store.put(key, {"job": {}}, {"a": b"new"})  # not replaced without replace=
    assert store.put(key, {"job": {}}, {"a": b"new"}, replace=True)
    assert store.get(key).files() == {"a": b"new"} and not any((tmp_path / "tmp").iterdir())


def test_overlap_cannot_read_a_swept_importance():
    from mechicl.experiments.grid import GridError

    data = {"grid": {"models": ["m"], "tasks": [TASK_A], "shots": [0]},
            "analyses": {"scan": {}, "importance": {"method": ["bansal", "michel"]},
                         "overlap": {}}}
    with pytest.raises(GridError, match=r"give one value of importance.method, not a list"):
        parse_grid(data)
    data["grid"].pop("shots")
    data["analyses"]["importance"] = {}
    with pytest.raises(GridError, match=r"give grid.shots"):
        parse_grid(data)
