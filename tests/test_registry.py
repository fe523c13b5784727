"""The analysis registry: options and their checks, one default per option across entry points,
a toy analysis registered through the registry alone reaching the CLI, grid files, `mechicl
run` and `mechicl runs`, and the same result, byte for byte, from the CLI, a grid and the
report."""

import dataclasses
import inspect
import json
import textwrap

import pytest
import torch

import mechicl
from mechicl.analyses import ANALYSES, Analysis, Call, Job, Option, OptionError, register_analysis
from mechicl.analyses.attribution import attribution_patch
from mechicl.analyses.evaluation import evaluate
from mechicl.analyses.importance import ffn_importance, head_importance
from mechicl.analyses.induction import induction_scan
from mechicl.analyses.patching import patch
from mechicl.analyses.path_patching import path_patch
from mechicl.analyses.pruning import prune_curve
from mechicl.cli import main
from mechicl.experiments.grid import GridError, parse_grid
from mechicl.experiments.outputs import model_folder
from mechicl.experiments.store import ResultStore
from mechicl.report import REPORT, ReportConfig
from mechicl.results import HeadScores

# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, match", [
    (Option(name="n", type=int, default=1, minimum=1, help=""), 0, r"a.n = 0: need an integer >= 1"),
    (Option(name="n", type=int, default=1, help=""), True, r"booleans are not numbers"),
    (Option(name="n", type=int, default=1, help=""), "3", r"a.n = '3': need an integer"),
    (Option(name="m", type=str, default="x", choices=("x", "y"), help=""), "z",
     r"a.m = 'z' is not allowed; choose one of \['x', 'y'\]"),
    (Option(name="l", type=list, item=int, default=[1], help=""), [], r"at least one"),
    (Option(name="l", type=list, item=int, default=[1], help=""), [1, 1], r"duplicates"),
    (Option(name="l", type=list, item=int, default=[1], help=""), [1, "2"], r"\['2'\] are not"),
    (Option(name="p", type=list, item=float, default=[0.0], must_contain=0, minimum=0,
            below=100, help=""), [10], r"containing 0"),
    (Option(name="p", type=list, item=float, default=[0.0], must_contain=0, minimum=0,
            below=100, help=""), [0, 100], r"< 100"),
    (Option(name="s", type=str, default=None, nullable=False, choices=("x",), help="",
            ), None, r"need a string"),
])
def test_option_errors_name_the_option_value_and_what_is_allowed(option, value, match):
    with pytest.raises(OptionError, match=match):
        option.check(value, "a." + option.name)


def test_option_values_have_one_spelling():
    floats = Option(name="p", type=list, item=float, default=[0.0], help="")
    assert floats.check([0, 10]) == [0.0, 10.0]  # 10 and 10.0: the same job key
    assert Option(name="t", type=float, default=1.0, help="").check(3) == 3.0
    assert Option(name="l", type=list, item=str, default=["a"], help="").check(("a", "b")) == [
        "a", "b"]


def test_an_option_default_is_checked_at_declaration():
    with pytest.raises(OptionError, match="its default"):
        Analysis(name="bad", help="", run=lambda call: None, result_type=HeadScores,
                 options=(Option(name="n", type=int, default=0, minimum=1, help=""),))


def test_resolve_fills_defaults_and_rejects_unknown_options():
    spec = ANALYSES["importance"]
    options = spec.resolve({"n": 7})
    assert options["n"] == 7 and options["method"] == "bansal"
    assert set(options) == {o.name for o in spec.options}
    with pytest.raises(OptionError, match=r"unknown option importance.nn; allowed: \["):
        spec.resolve({"nn": 3})
    with pytest.raises(OptionError, match="only apply to method='ablation'"):
        spec.resolve({"metric": "accuracy"})


def test_names_and_commands_are_unique():
    spec = ANALYSES["scan"]
    with pytest.raises(ValueError, match="already registered"):
        register_analysis(spec)
    with pytest.raises(ValueError, match="command 'eval' is already taken"):
        register_analysis(dataclasses.replace(spec, name="another", command="eval"))
    with pytest.raises(OptionError, match="unknown analysis 'nope'; known:"):
        mechicl.analyses.get_analysis("nope")


def test_job_keys_leave_out_execution_and_output_options():
    spec = ANALYSES["importance"]
    identity = {"weights_sha256": "w", "tokenizer_sha256": "t"}
    a = spec.job("m", {"batch_tokens": 512}, task="antonyms", shots=1)
    b = spec.job("other-name", {"batch_tokens": 4096, "shared_scale": True}, task="antonyms",
                 shots=1)
    c = spec.job("m", {"n": 49}, task="antonyms", shots=1)
    assert a.key(identity, "v") == b.key(identity, "v") != c.key(identity, "v")
    assert Job.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_a_code_version_changes_the_keys_of_its_analysis_only_once_set(monkeypatch):
    """Raising an analysis's code_version invalidates its stored results (e.g. the report's
    rendering changed); None keeps the key it had before the field existed."""
    identity = {"weights_sha256": "w", "tokenizer_sha256": "t"}
    spec = ANALYSES["importance"]
    job = spec.job("m", {}, task="antonyms", shots=1)
    before = job.key(identity, "v")
    versions = {}
    for version in (None, 1, 2):
        monkeypatch.setitem(ANALYSES, "importance",
                            dataclasses.replace(spec, code_version=version))
        versions[version] = job.key(identity, "v")
    assert versions[None] == before
    assert len(set(versions.values())) == 3
    assert REPORT.code_version is not None  # the report's rendering is versioned


# ---- one default per option ----------------------------------------------------------------


@pytest.mark.parametrize("analysis, function, names", [
    ("importance", head_importance, {"method": "method", "n": "n", "ablation": "ablation",
                                     "metric": "metric", "normalize_layers": "normalize_layers",
                                     "token_normalization": "token_normalization",
                                     "batch_tokens": "batch_tokens"}),
    ("ffn_importance", ffn_importance, {"n": "n", "metric": "metric", "ablation": "ablation",
                                        "batch_tokens": "batch_tokens"}),
    ("accuracy", evaluate, {"n": "n", "normalization": "normalization",
                            "batch_tokens": "batch_tokens"}),
    ("scan", induction_scan, {"n_seeds": "n_seeds", "indexing": "indexing",
                              "stream": "stream", "batch_tokens": "batch_tokens"}),
    ("pruning", prune_curve, {"draws": "random_draws", "ablation": "ablation",
                              "batch_tokens": "batch_tokens"}),
    ("patching", patch, {"target": "target", "direction": "direction", "metric": "metric",
                         "kv_heads": "kv_heads", "batch_tokens": "batch_tokens"}),
    ("attribution", attribution_patch, {"target": "target", "direction": "direction",
                                        "metric": "metric", "kv_heads": "kv_heads"}),
    ("path_patching", path_patch, {"direction": "direction", "metric": "metric",
                                   "receiver_input": "receiver_input",
                                   "batch_tokens": "batch_tokens"}),
])
def test_python_api_defaults_are_the_registry_defaults(analysis, function, names):
    """The functions' keyword defaults, the CLI's (flags default to the record's) and grids'
    (the record's) agree."""
    spec = ANALYSES[analysis]
    params = inspect.signature(function).parameters
    for option, arg in names.items():
        assert params[arg].default == spec.option(option).default, (analysis, option)


def test_report_config_defaults_are_the_report_records():
    config = ReportConfig(tasks=("antonyms",), prune_tasks=("antonyms",))
    defaults = REPORT.defaults()
    for name, value in config.options().items():
        if name not in ("tasks", "prune_tasks"):
            assert value == defaults[name], name
    # and the report's settings are the analyses' settings where they overlap
    assert config.n == ANALYSES["importance"].option("n").default
    assert config.draws == ANALYSES["pruning"].option("draws").default
    assert config.scan_seeds == ANALYSES["scan"].option("n_seeds").default


def test_cli_flags_default_to_the_registry(capsys):
    from mechicl.cli import build_parser

    args = build_parser().parse_args(["importance", "--tasks", "antonyms", "--out", "x"])
    given = {o.name: getattr(args, o.name) for o in ANALYSES["importance"].options}
    assert all(v is None for v in given.values())  # not given: the record's default applies
    args = build_parser().parse_args(["importance", "--tasks", "antonyms", "--out", "x",
                                      "--method", "bansal,ablation", "--n", "20"])
    assert args.method == ["bansal", "ablation"] and args.n == 20
    with pytest.raises(SystemExit):
        build_parser().parse_args(["importance", "--tasks", "antonyms", "--out", "x",
                                   "--method", "gradient"])
    assert "choose one of ['bansal', 'michel', 'ablation', 'attribution']" in capsys.readouterr().err


# ---- a toy analysis, registered through the registry alone ------------------------------------


def _toy_run(call: Call) -> HeadScores:
    """Weight norm of every head's W_O times ``scale``: a model analysis with no task."""
    norms = call.model.W_O.detach().flatten(2).norm(dim=-1) * call.options["scale"]
    return HeadScores.from_per_seed("toy_norms", norms[None],
                                    params={"scale": call.options["scale"]},
                                    model=call.model.info())


@pytest.fixture
def toy():
    spec = register_analysis(Analysis(
        name="toy_norms", command="toy-norms", help="norms of W_O (a test analysis)",
        run=_toy_run, result_type=HeadScores, memory=None,
        options=(Option(name="scale", type=float, default=1.0, minimum=0,
                        help="multiply the norms by this"),)))
    yield spec
    del ANALYSES[spec.name]


def test_toy_analysis_reaches_cli_grid_run_and_runs(toy, tiny_folder, tmp_path, capsys):
    # the CLI: a subcommand with its option
    with pytest.raises(SystemExit) as exit_:
        main(["toy-norms", "--help"])
    assert exit_.value.code == 0
    assert "--scale" in capsys.readouterr().out
    store = tmp_path / "store"
    assert main(["toy-norms", "--model", str(tiny_folder), "--scale", "2", "--store",
                 str(store), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    stem = f"{tiny_folder.name}-toy_norms"  # the default output name: model, analysis
    stored = mechicl.load_result(tmp_path / "out" / model_folder(str(tiny_folder)) / "results" / stem)
    assert stored.params == {"scale": 2.0}
    capsys.readouterr()

    # grid validation
    grid = textwrap.dedent(f"""
        [grid]
        models = ["{tiny_folder}"]
        [analyses.toy_norms]
        scale = 2
    """)
    with pytest.raises(GridError, match=r"analyses.toy_norms.scale = -1.0: need a number >= 0"):
        parse_grid({"grid": {"models": ["m"]}, "analyses": {"toy_norms": {"scale": -1.0}}})
    with pytest.raises(GridError, match=r"unknown option analyses.toy_norms.size"):
        parse_grid({"grid": {"models": ["m"]}, "analyses": {"toy_norms": {"size": 1}}})
    path = tmp_path / "grid.toml"
    path.write_text(grid)

    # mechicl run: the CLI run computed it already (same weights, options and version)
    assert main(["run", str(path), "--store", str(store), "--no-progress"]) == 0
    assert "0 computed, 1 already in the store" in capsys.readouterr().out
    entry = next(ResultStore(store).entries())
    torch.testing.assert_close(mechicl.load_result(entry.path).mean, stored.mean)
    other = tmp_path / "grid3.toml"
    other.write_text(grid.replace("scale = 2", "scale = 3"))
    assert main(["run", str(other), "--store", str(store), "--no-progress"]) == 0
    assert "1 computed" in capsys.readouterr().out

    # mechicl runs
    assert main(["runs", "--store", str(store), "--analysis", "toy_norms", "--csv"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == 3 and all(",toy_norms," in row for row in listed[1:])


# ---- the same result from every entry point --------------------------------------------------


def test_cli_grid_and_report_compute_the_same_bytes(tiny_folder, tmp_path, capsys):
    """Head importance of one task x shot count, with the same options, through the CLI, a grid
    file and the report: the same key and byte-identical result files."""
    import dataclasses as dc

    import reference_importance as ref

    from mechicl.analyses.pruning import split_prompts
    from mechicl.inputs.tasks import TASKS, load_task, register_task
    from mechicl.report import build_report

    name = "registry_copy_task"
    if name not in TASKS:
        register_task(name, lambda: dc.replace(ref.copy_task(40, seed=3), name=name))
    assert len(split_prompts(load_task(name), shots=1, n_rank=6, n_eval=8)[1]) == 8
    stores = {k: ResultStore(tmp_path / k) for k in ("cli", "grid", "report")}
    assert main(["importance", "--model", str(tiny_folder), "--tasks", name, "--shots", "1",
                 "--n", "6", "--store", str(stores["cli"].root), "--out",
                 str(tmp_path / "cli-out"), "--no-progress"]) == 0
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(f"""
        [grid]
        models = ["{tiny_folder}"]
        tasks = ["{name}"]
        shots = [1]
        [analyses.importance]
        n = 6
    """))
    assert main(["run", str(grid), "--store", str(stores["grid"].root), "--no-progress"]) == 0
    model = mechicl.load_model(str(tiny_folder))
    build_report(model, tmp_path / "report", ReportConfig(
        tasks=(name,), shots=(1,), n=6, eval_n=8, scan_seeds=2, scan_length=8,
        prune_tasks=(), ffn=False, n_permutations=10, n_resamples=10, causal_ks=()),
        store=stores["report"])
    capsys.readouterr()
    found = {k: {e.key: e for e in s.entries() if e.manifest["job"]["analysis"] == "importance"}
             for k, s in stores.items()}
    keys = [set(v) for v in found.values()]
    assert len(keys[0]) == 1 and keys[0] == keys[1] == keys[2]
    key = next(iter(keys[0]))
    files = [found[k][key].files() for k in stores]
    assert files[0] == files[1] == files[2]
    assert len(files[0]) >= 2


def test_the_docs_show_the_current_defaults_table():
    from pathlib import Path

    from mechicl.analyses import options_markdown

    page = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
    assert options_markdown() in page.read_text(), (
        "docs/architecture.md's defaults table is stale: paste mechicl.analyses.options_markdown()")
