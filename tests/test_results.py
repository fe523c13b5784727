"""The one result protocol: every result type saves one folder layout with the same provenance
fields, loads through load_result (dispatch on kind), and is verified on load (format version,
checksums of the data and of result.json itself); every committed result folder loads."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechicl
from mechicl.analyses.evaluation import EvalResult
from mechicl.analyses.induction import ScanResult
from mechicl.analyses.overlap import OverlapTable
from mechicl.analyses.patching import PatchResult
from mechicl.analyses.pruning import PruneCurve
from mechicl.results import (
    FORMAT_VERSION,
    RESULT_TYPES,
    HeadScores,
    LayerScores,
    ResultError,
    load_result,
    result_type,
)

FIGURES = Path(__file__).resolve().parents[1] / "figures"
MODEL = {"name": "m", "weights_sha256": "w" * 64, "tokenizer_sha256": "t" * 64}


def examples() -> list:
    heads = HeadScores.from_per_seed("s", torch.rand(3, 2, 4), params={"a": 1}, model=MODEL,
                                     tokens=[torch.arange(5), torch.arange(3)],
                                     extras={"loss": torch.rand(2, 7)})
    layers = LayerScores.from_per_seed("f", torch.rand(4, 2), params={"b": 2}, model=MODEL)
    preds = pd.DataFrame({"id": ["x", "y"], "correct": [True, False],
                          "loglik": [[-1.0, -2.0], [-0.5, -0.1]]})
    evaluation = EvalResult(task="t", shots=1, accuracy=0.5, ci_low=0.1, ci_high=0.9, n=2,
                            chance=0.5, predictions=preds, params={"n": 2}, model=MODEL)
    curve = PruneCurve(data=pd.DataFrame({"head_percent": [0.0, 50.0], "accuracy": [1.0, 0.5]}),
                       params={"draws": 1}, model=MODEL)
    patched = PatchResult(target="head_out", axes=("layer", "head"), values=torch.rand(2, 4),
                          per_pair=torch.rand(2, 4, 3), clean=torch.rand(3),
                          corrupted=torch.rand(3), metric="logit_diff", normalized=False,
                          direction="denoising", params={"n_pairs": 3}, model=MODEL)
    scan = ScanResult(scores={"prefix_matching": heads}, loss_first_copy=torch.rand(3),
                      loss_later_copies=torch.rand(3), params={"scores": ["prefix_matching"]},
                      model=MODEL)
    table = OverlapTable(data=pd.DataFrame({"spearman": [0.5]}), params={"k": 1}, model=MODEL)
    return [heads, layers, evaluation, curve, patched, scan, table]


@pytest.mark.parametrize("result", examples(), ids=lambda r: type(r).__name__)
def test_every_result_type_round_trips_through_load_result(result, tmp_path):
    path = result.save(tmp_path / "r")
    meta = json.loads((path / "result.json").read_text())
    assert meta["format"] == FORMAT_VERSION and meta["kind"] == type(result).__name__
    assert meta["params"] == result.params and meta["model"] == result.model
    back = load_result(path)
    assert type(back) is type(result) and back.params == result.params
    assert back.model == result.model
    for name in ("mean", "values", "loss_first_copy"):
        if hasattr(result, name):
            torch.testing.assert_close(getattr(back, name), getattr(result, name))
    for name in ("data", "predictions"):
        if hasattr(result, name):
            pd.testing.assert_frame_equal(getattr(back, name), getattr(result, name))
    assert type(result).__name__ in RESULT_TYPES


def test_corruption_is_detected_and_names_the_file(tmp_path):
    heads = examples()[0]
    path = heads.save(tmp_path / "r")
    tensors = path / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the numbers
    tensors.write_bytes(bytes(data))
    with pytest.raises(ResultError, match=r"tensors.safetensors: checksum mismatch"):
        load_result(path)
    path = heads.save(tmp_path / "r")
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    with pytest.raises(ResultError, match="checksum mismatch"):
        load_result(path)
    path = heads.save(tmp_path / "r")
    meta = json.loads((path / "result.json").read_text())
    meta["params"]["a"] = 2  # an edited number in the metadata
    (path / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ResultError, match=r"result.json: checksum mismatch"):
        load_result(path)
    meta["format"] = 99
    (path / "result.json").write_text(json.dumps(meta))
    with pytest.raises(ResultError, match=r"format 99 is not 2"):
        load_result(path)
    (path / "result.json").write_text("{broken")
    with pytest.raises(ResultError, match="not valid JSON"):
        load_result(path)
    (path / "result.json").unlink()
    (path / "meta.json").write_text("{}")
    with pytest.raises(ResultError, match="mechicl < 0.2; convert it with scripts/migrate"):
        load_result(path)


def test_a_result_of_another_kind_is_refused(tmp_path):
    path = examples()[1].save(tmp_path / "layers")
    with pytest.raises(ResultError, match="holds a LayerScores, not a HeadScores"):
        HeadScores.load(path)


def test_result_types_register_once():
    @result_type
    class Probe:  # noqa: B903 - a minimal result type
        def __init__(self, x: int) -> None:
            self.x = x

    try:
        with pytest.raises(ValueError, match="already registered"):
            result_type(type("Probe", (), {}))
    finally:
        del RESULT_TYPES["Probe"]


def committed_result_folders() -> list[Path]:
    return sorted(p.parent for p in FIGURES.rglob("result.json"))


def test_every_committed_result_folder_loads():
    """Every result under figures/ is in the current protocol (the migration script converted
    the older ones) and loads, verified."""
    legacy = [str(p) for name in ("meta.json", "curve.json") for p in FIGURES.rglob(name)]
    assert not legacy, f"unconverted results (scripts/migrate_results.py): {legacy[:5]}"
    folders = committed_result_folders()
    assert len(folders) > 100
    kinds = set()
    for folder in folders:
        kinds.add(type(load_result(folder)).__name__)
    assert {"HeadScores", "ScanResult", "EvalResult", "PruneCurve", "PatchResult",
            "LayerScores", "Report"} <= kinds


def test_committed_indexes_name_their_results():
    """The indexes that let a store reuse committed results point at results that exist."""
    from mechicl.experiments.store import read_index

    indexes = sorted(p.parent for p in FIGURES.rglob("index.json"))
    assert FIGURES / "smollm2-135m" / "results" in indexes and FIGURES / "report" / "results" in indexes
    for folder in indexes:
        for name, entry in read_index(folder).items():
            assert (folder / name / "result.json").is_file(), (folder, name)
            assert len(entry["key"]) == 64
    assert mechicl.load_result(FIGURES / "smollm2-135m" / "results" / "smollm2-135m-scan").params["n_seeds"] == 100


def _renamed(data: dict) -> dict:
    """A job (or result params) written before ``length_normalize`` became ``normalization``
    (mechicl 0.3): the same settings under the new name (False: summed log-probabilities)."""
    data = json.loads(json.dumps(data))
    for where in (data, data.get("options", {})):
        if "length_normalize" in where:
            where["normalization"] = "tokens" if where.pop("length_normalize") else "none"
    return data


def test_renamed_jobs_keep_their_settings():
    old = {"analysis": "accuracy", "options": {"n": 50, "length_normalize": False}}
    assert _renamed(old)["options"] == {"n": 50, "normalization": "none"}
    assert _renamed({"length_normalize": True}) == {"normalization": "tokens"}
    assert "length_normalize" in old["options"]  # the caller's dict is left alone


@pytest.mark.slow
def test_committed_results_of_the_old_pipeline_equal_the_new_one(smollm2, tmp_path):
    """Before / after the rebuild around the registry: results the earlier code computed for the
    committed report (migrated by scripts/migrate_results.py) equal what the registered analyses
    compute now for the same job, through the CLI's path (run_jobs + the store)."""
    from mechicl.experiments.grid import ModelEntry
    from mechicl.experiments.runner import LocalExecutor, run_jobs
    from mechicl.experiments.store import ResultStore, read_index

    index = read_index(FIGURES / "report" / "results")
    names = ["accuracy/antonyms-1shot", "importance/antonyms-1shot-bansal"]
    jobs = [mechicl.Job.from_dict(_renamed(index[name]["job"])) for name in names]
    store = ResultStore(tmp_path / "store")
    # the committed results ran on F.linear: the same kernel here, so that what is compared is
    # the pipeline (packed weights against F.linear: tests/test_kernels.py)
    kernel = smollm2.linear_kernel
    smollm2.use_linear_kernel("plain")
    try:
        summary = run_jobs(jobs, store, entries={"smollm2-135m": ModelEntry(
            name="smollm2-135m", spec="smollm2-135m")}, progress=False,
            executor=LocalExecutor(models={"smollm2-135m": smollm2}))
    finally:
        smollm2.use_linear_kernel(kernel)
    assert summary.ok and [r["status"] for r in summary.jobs] == ["computed", "computed"]
    for name, row in zip(names, summary.jobs, strict=True):
        if _renamed(index[name]["job"]) == index[name]["job"]:
            assert row["key"] == index[name]["key"], name  # the key the migration gave it
        old, new = load_result(FIGURES / "report" / "results" / name), store.get(row["key"]).load()
        params = _renamed(old.params)
        assert set(new.params) - set(params) <= {"signed"}, name  # added since (issue 21)
        assert {k: new.params[k] for k in params} == params, name
        if name.startswith("accuracy"):
            assert new.accuracy == old.accuracy
            columns = [c for c in old.predictions.columns if c != "loglik"]  # + n_chars now
            pd.testing.assert_frame_equal(new.predictions[columns], old.predictions[columns])
            torch.testing.assert_close(  # summed log-probabilities: thread-count rounding
                torch.tensor(new.predictions.loglik.tolist()),
                torch.tensor(old.predictions.loglik.tolist()), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(new.mean, old.mean, rtol=1e-5, atol=1e-7)
            # per-prompt gradients are float32 sums whose order depends on the thread count: allow
            # float32 rounding relative to the largest score (3.7 here), not to each entry
            scale = float(old.per_seed.abs().max())
            torch.testing.assert_close(new.per_seed, old.per_seed, rtol=1e-5, atol=1e-6 * scale)
