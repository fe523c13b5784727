"""Experiment grids (issue 8, part 1): TOML / YAML parsing, validation errors that name the bad key,
job expansion, and content-addressed job keys."""

import pytest

from mechicl.experiments.grid import Grid, GridError, Job, load_grid, parse_grid

GOOD = """
[grid]
models = ["smollm2-135m", "gemma3-270m"]
tasks = ["country_capital", "antonyms", "sentiment"]
shots = [0, 1, 5]
seeds = [0, 1]

[analyses.scan]
scores = ["prefix_matching", "copying"]
n_seeds = 100

[analyses.importance]
method = "bansal"
n = 50
"""


def test_expands_models_x_tasks_x_shots_x_seeds(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GOOD)
    grid = load_grid(path)
    assert isinstance(grid, Grid) and grid.shots == (0, 1, 5)
    jobs = grid.jobs()
    scans = [j for j in jobs if j.analysis == "scan"]
    imps = [j for j in jobs if j.analysis == "importance"]
    assert len(scans) == 2 * 2  # models x seeds: scans do not depend on tasks
    assert len(imps) == 2 * 3 * 3 * 2
    assert {(j.model, j.task, j.shots, j.seed) for j in imps} == {
        (m, t, s, seed) for m in grid.models for t in grid.tasks for s in grid.shots
        for seed in grid.seeds}
    assert all(j.task is None and j.shots is None for j in scans)
    # complete options: the given ones and the registry's defaults for the rest
    from mechicl.analyses import ANALYSES

    assert imps[0].options == ANALYSES["importance"].resolve({"method": "bansal", "n": 50})
    assert jobs == grid.jobs()  # stable order
    assert imps[0].describe() == "importance smollm2-135m country_capital 0-shot seed 0"


def test_keys_change_with_weights_options_version_and_only_then():
    ident = {"weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
    job = Job(analysis="importance", model="smollm2-135m", seed=0, task="antonyms", shots=1,
              options={"n": 50, "method": "bansal"})
    key = job.key(ident, "0.1.0")
    assert len(key) == 64 and key == job.key(dict(reversed(list(ident.items()))), "0.1.0")
    # the model's name is not part of the key: same weights, same results
    renamed = Job(analysis="importance", model="my-copy", seed=0, task="antonyms", shots=1,
                  options={"method": "bansal", "n": 50})
    assert renamed.key(ident, "0.1.0") == key
    changed = [
        job.key({**ident, "weights_sha256": "c" * 64}, "0.1.0"),
        job.key({**ident, "tokenizer_sha256": "c" * 64}, "0.1.0"),
        job.key(ident, "0.2.0"),
        Job(analysis="importance", model="x", seed=1, task="antonyms", shots=1,
            options={"n": 50, "method": "bansal"}).key(ident, "0.1.0"),
        Job(analysis="importance", model="x", seed=0, task="antonyms", shots=5,
            options={"n": 50, "method": "bansal"}).key(ident, "0.1.0"),
        Job(analysis="importance", model="x", seed=0, task="sentiment", shots=1,
            options={"n": 50, "method": "bansal"}).key(ident, "0.1.0"),
        Job(analysis="importance", model="x", seed=0, task="antonyms", shots=1,
            options={"n": 51, "method": "bansal"}).key(ident, "0.1.0"),
        Job(analysis="accuracy", model="x", seed=0, task="antonyms", shots=1,
            options={"n": 50, "method": "bansal"}).key(ident, "0.1.0"),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize("text, match", [
    ("[grid]\nmodels=['m']\n[analyses.scan]\n[extra]\n", r"unknown top-level keys \['extra'\]"),
    ("[analyses.scan]\n", r"missing \[grid\]"),
    ("[grid]\nmodel=['m']\n[analyses.scan]\n", r"unknown keys \['model'\] in \[grid\]"),
    ("[grid]\nmodels=[]\n[analyses.scan]\n", r"grid.models = \[\]: need a non-empty list"),
    ("[grid]\nmodels=['m', 'm']\n[analyses.scan]\n", "has duplicates"),
    ("[grid]\nmodels=['m']\ntasks=['nope']\n[analyses.scan]\n", r"unknown tasks \['nope'\]"),
    ("[grid]\nmodels=['m']\nshots=[-1]\n[analyses.scan]\n", "must be >= 0"),
    ("[grid]\nmodels=['m']\nseeds=[true]\n[analyses.scan]\n", r"grid.seeds: \[True\] are not ints"),
    ("[grid]\nmodels=['m']\n", "no analyses"),
    ("[grid]\nmodels=['m']\n[analyses.probe]\n", r"unknown analysis \[analyses.probe\]"),
    ("[grid]\nmodels=['m']\n[analyses.importance]\n", "runs per task: give grid.tasks"),
    ("[grid]\nmodels=['m']\n[analyses.scan]\nseeds=3\n", "unknown option analyses.scan.seeds"),
    ("[grid]\nmodels=['m']\n[analyses.scan]\nn_seeds='3'\n", "analyses.scan.n_seeds = '3': need an integer"),
    ("[grid]\nmodels=['m']\n[analyses.scan]\nn_seeds=0\n", "need an integer >= 1"),
    ("[grid]\nmodels=['m']\n[analyses.scan]\nscores=['prefix']\n", r"analyses.scan.scores = \['prefix'\] is not allowed; choose from"),
    ("[grid]\nmodels=['m']\ntasks=['antonyms']\n[analyses.importance]\nmethod='grad'\n",
     r"analyses.importance.method = 'grad' is not allowed; choose one of"),
    ("[grid]\nmodels=['m']\ntasks=['antonyms']\n[analyses.accuracy]\nnormalization='acc_norm'\n",
     "analyses.accuracy.normalization = 'acc_norm' is not allowed"),
    ("[grid]\nmodels=['m']\n[models.m]\nlinear_kernel='fast'\n[analyses.scan]\n",
     r"models.m.linear_kernel = 'fast': choose one of \['auto', 'packed', 'plain'\]"),
])
def test_errors_name_the_bad_key(tmp_path, text, match):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(GridError, match=match):
        load_grid(path)


def test_file_errors(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid\nmodels = 1")
    with pytest.raises(GridError, match="not valid TOML"):
        load_grid(bad)
    with pytest.raises(GridError, match="missing"):
        parse_grid({})
    for text, match in [("grid: [1, 2", "not valid YAML"), ("- 1\n- 2", "got list")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(GridError, match=match):
            load_grid(tmp_path / "bad.yaml")
    (tmp_path / "bad.yml").write_text("grid:\n  models: [m]\n  tasks: [boolq]\n  shots: [0]\n"
                                      "analyses:\n  scan: {n_seedz: 3}\n")
    with pytest.raises(GridError, match=r"bad.yml: .*analyses.scan.n_seedz"):
        load_grid(tmp_path / "bad.yml")


def test_yaml_grid_equals_toml(tmp_path):
    (tmp_path / "grid.toml").write_text(GOOD)
    (tmp_path / "grid.yaml").write_text("""
grid:
  models: [smollm2-135m, gemma3-270m]
  tasks: [country_capital, antonyms, sentiment]
  shots: [0, 1, 5]
  seeds: [0, 1]
analyses:
  scan: {scores: [prefix_matching, copying], n_seeds: 100}
  importance: {method: bansal, n: 50}
""")
    assert load_grid(tmp_path / "grid.yaml") == load_grid(tmp_path / "grid.toml")
