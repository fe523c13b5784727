"""TransformerLens habits: the same calls on a plain ``TransformerBridge`` and on mechicl's
``HookedModel`` give the same answers, except where mechicl deliberately differs (each such
difference is asserted here and stated in docs/interop.md).

The plain bridge and the wrapped model are built from the same tiny config and seed, so they
have the same weights and tokenizer.
"""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import mechicl
from mechicl.model import HookedModel, load_model
from mechicl.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["w1 w2 w3", "w4", "w5 w6"]


@pytest.fixture(scope="module")
def pair():
    """(plain bridge, mechicl model over an identical bridge), GQA Llama-like."""
    return tiny_model("llama", seed=3), mechicl.as_hooked_model(tiny_model("llama", seed=3))


@pytest.fixture
def fresh():
    """A model of our own, for calls that change it (casts, moves)."""
    return tiny_model("llama", seed=4), mechicl.as_hooked_model(tiny_model("llama", seed=4))


# ---- tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m: m.to_tokens("w1 w2"),
    lambda m: m.to_tokens(TEXTS),
    lambda m: m.to_tokens("w1 w2", False),                 # prepend_bos positionally
    lambda m: m.to_tokens("w1 w2", prepend_bos=False),
    lambda m: m.to_tokens(TEXTS, True, "left"),            # padding_side positionally
    lambda m: m.to_tokens(TEXTS, padding_side="right"),
    lambda m: m.to_tokens(TEXTS, prepend_bos=False, padding_side="left"),
    lambda m: m.to_tokens("w1", move_to_device=False),
    lambda m: m.to_tokens(" ".join(["w7"] * 600)),         # truncated to n_ctx = 512
    lambda m: m.to_tokens(" ".join(["w7"] * 600), truncate=False),
], ids=["str", "list", "bos-positional", "bos-keyword", "left-positional", "right", "left-nobos",
        "no-move", "truncate", "no-truncate"])
def test_to_tokens_matches_the_bridge(pair, call):
    bridge, model = pair
    ours, theirs = call(model), call(bridge)
    assert ours.dtype == theirs.dtype == torch.long and ours.device == theirs.device
    assert ours.tolist() == theirs.tolist()


def test_truncation_and_cfg_default_prepend_bos(fresh):
    bridge, model = fresh
    assert model.to_tokens(" ".join(["w7"] * 600)).shape == (1, model.n_ctx)
    assert model.to_tokens(" ".join(["w7"] * 600), truncate=False).shape == (1, 601)
    # prepend_bos=None follows cfg.default_prepend_bos, as in TransformerLens
    for m in (bridge, model):
        m.cfg.default_prepend_bos = False
    assert model.to_tokens("w1").tolist() == bridge.to_tokens("w1").tolist() == [[5]]
    assert model.to_tokens("w1", True).tolist() == [[0, 5]]


@pytest.mark.parametrize("make_input", [
    lambda m: "w1 w2 w3",
    lambda m: ["w1 w2", "w3"],
    lambda m: m.to_tokens("w1 w2"),                        # [1, pos]: the case
    lambda m: m.to_tokens("w1 w2")[0],                     # [pos]
    lambda m: m.to_tokens("w1")[0, 1],                     # a scalar
    lambda m: m.to_tokens("w1 w2").numpy(),
], ids=["str", "list-of-str", "tensor-2d", "tensor-1d", "tensor-0d", "numpy"])
@pytest.mark.parametrize("kwargs", [{}, {"prepend_bos": False}], ids=["default", "no-bos"])
def test_to_str_tokens_matches_the_bridge(pair, make_input, kwargs):
    bridge, model = pair
    x = make_input(bridge)
    assert model.to_str_tokens(x, **kwargs) == bridge.to_str_tokens(x, **kwargs)


def test_to_str_tokens_of_to_tokens_is_one_list_of_tokens(pair):
    _, model = pair
    assert model.to_str_tokens(model.to_tokens("w1 w2")) == ["<bos>", "w1", "w2"]
    assert model.to_str_tokens("w1 w2", False) == ["w1", "w2"]


def test_to_str_tokens_documented_differences(pair):
    """A list of ints is one sequence of ids for mechicl (TransformerLens rejects it); a batch
    of several rows is refused with a one-line message naming its shape (TL asserts)."""
    bridge, model = pair
    with pytest.raises(ValueError, match="Invalid input type"):
        bridge.to_str_tokens([0, 5, 6])
    assert model.to_str_tokens([0, 5, 6]) == bridge.to_str_tokens(torch.tensor([0, 5, 6]))
    assert model.to_str_tokens([]) == model.to_str_tokens(torch.tensor([], dtype=torch.long)) == []
    with pytest.raises(ValueError, match=r"got shape \(2, 3\): pass one row"):
        model.to_str_tokens(model.to_tokens(["w1 w2", "w3 w4"]))
    # the message users see (under pytest the type checker rejects the float first)
    to_str_tokens = getattr(HookedModel.to_str_tokens, "__wrapped__", HookedModel.to_str_tokens)
    with pytest.raises(TypeError, match=r"to_str_tokens takes a string, .* got float"):
        to_str_tokens(model, 1.5)


@pytest.mark.parametrize("make_input", [
    lambda m: m.to_tokens(TEXTS), lambda m: m.to_tokens("w1 w2")[0], lambda m: [0, 5, 6],
    lambda m: np.array([0, 5, 6]),
], ids=["2d", "1d", "list", "numpy"])
def test_to_string_matches_the_bridge(pair, make_input):
    bridge, model = pair
    x = make_input(bridge)
    assert model.to_string(x) == bridge.to_string(x)


def test_to_single_token_matches_the_bridge(pair):
    bridge, model = pair
    assert model.to_single_token("w3") == bridge.to_single_token("w3") == 7
    with pytest.raises(ValueError, match=r"'w1 w2' is 2 tokens, not one"):
        model.to_single_token("w1 w2")


def test_bos_is_added_by_id_whatever_the_tokenizer_default(fresh):
    """Documented difference: the bridge's BOS depends on the tokenizer adding one; mechicl's
    does not (here the tokenizer is told not to add BOS: the bridge loses it, mechicl keeps it).
    """
    bridge, model = fresh
    for tok in (bridge.tokenizer, model.tokenizer):
        tok.add_bos_token = False
    assert model.to_tokens("w1").tolist() == [[0, 5]]
    assert bridge.to_tokens("w1").tolist() != [[0, 5]]


# ---- the model: forward, hooks, cache ------------------------------------------------------

def test_forward_loss_cache_and_hooks_match_the_bridge(pair):
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS)
    with torch.no_grad():
        assert_close(model(tokens), bridge(tokens), rtol=0, atol=0)
        assert_close(model(tokens, return_type="loss"), bridge(tokens, return_type="loss"),
                     rtol=0, atol=0)
        names = ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
        _, ours = model.run_with_cache(tokens, names_filter=names)
        _, theirs = bridge.run_with_cache(tokens, names_filter=names)
        for name in names:
            assert_close(ours[name], theirs[name], rtol=0, atol=0)

        def zero_head(z, hook):
            z[:, :, 1] = 0.0
            return z

        hooks = [("blocks.1.attn.hook_z", zero_head)]
        ablated = model.run_with_hooks(tokens, fwd_hooks=hooks)
        assert_close(ablated, bridge.run_with_hooks(tokens, fwd_hooks=hooks), rtol=0, atol=0)
        assert not torch.equal(ablated, model(tokens))
        with model.hooks(fwd_hooks=hooks) as inside:
            assert inside is model  # like HookedTransformer: the context yields the model
            assert_close(inside(tokens), ablated, rtol=0, atol=0)
        assert_close(model(tokens), bridge(tokens), rtol=0, atol=0)  # hooks removed


# ---- moves and casts return the wrapper ----------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda m: m.to("cpu"), lambda m: m.to(torch.device("cpu")), lambda m: m.to(device="cpu"),
    lambda m: m.cpu(), lambda m: m.eval(), lambda m: m.train(False),
    lambda m: m.requires_grad_(False), lambda m: m.float(),
], ids=["to-str", "to-device", "to-kw", "cpu", "eval", "train", "requires_grad_", "float"])
def test_chained_calls_return_the_wrapper(fresh, call):
    bridge, model = fresh
    L, H, D, Dh = model.n_layers, model.n_heads, model.d_model, model.d_head
    returned = call(model)
    assert returned is model and isinstance(returned, HookedModel)
    # documented difference: W_K per query head (the bridge's has n_kv_heads heads)
    assert returned.W_K.shape == (L, H, D, Dh)
    assert call(bridge).W_K.shape == (L, model.n_kv_heads, D, Dh)


def test_casts_return_the_wrapper_and_refresh_the_weights_hash(fresh):
    bridge, model = fresh
    before = model.weights_hash
    assert model.half() is model and model.dtype == torch.float16
    assert model.W_K.dtype == torch.float16 and model.W_K.shape[1] == model.n_heads
    assert model.weights_hash != before  # the hash covers dtypes: not a stale cached value
    assert model.info()["dtype"] == "float16"
    assert model.to(torch.float32) is model and model.dtype == torch.float32
    assert model.bfloat16() is model and model.dtype == torch.bfloat16


def test_moves_do_not_print(fresh, capsys):
    """Documented difference: the bridge's ``to`` prints what it moves; mechicl does not."""
    bridge, model = fresh
    model.to("cpu")
    model.cpu()
    assert capsys.readouterr().out == ""
    bridge.to("cpu")
    assert "Moving model to device" in capsys.readouterr().out


def test_cuda_goes_through_to(fresh, monkeypatch):
    """cuda() on a CPU-only machine: check what reaches the bridge's ``to``."""
    _, model = fresh
    seen = []
    monkeypatch.setattr(model.bridge, "to", lambda *a, **k: seen.append((a, k)))
    assert model.cuda() is model and model.cuda(1) is model and model.mps() is model
    assert seen == [(("cuda",), {"print_details": False}), (("cuda:1",), {"print_details": False}),
                    (("mps",), {"print_details": False})]


# ---- names, config, devices ----------------------------------------------------------------

def test_dir_lists_the_bridges_names_too(pair):
    bridge, model = pair
    names = set(dir(model))
    missing = {n for n in dir(bridge) if not n.startswith("_")} - names
    assert not missing, sorted(missing)[:10]
    assert {"run_with_cache", "run_with_hooks", "W_K", "hook_name", "folded_weights",
            "to_tokens", "hooks", "generate"} <= names


def test_cfg_model_name_is_the_models_name_not_a_path(tiny_folder):
    from transformer_lens.model_bridge import TransformerBridge

    model = load_model(tiny_folder)
    assert model.cfg.model_name == tiny_folder.name == model.name
    # a plain bridge booted from the folder calls itself by the folder's path
    plain = TransformerBridge.boot_transformers(str(tiny_folder), device="cpu")
    assert plain.cfg.model_name == str(tiny_folder)


@pytest.mark.parametrize("cuda, mps, allow, expected", [
    (True, True, "1", "cuda"), (False, True, "1", "mps"), (False, True, "", "cpu"),
    (False, False, "1", "cpu"),
])
def test_default_device_follows_transformerlens(monkeypatch, cuda, mps, allow, expected):
    from transformer_lens.utilities import get_device

    from mechicl.model.loading import default_device, placement_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps)
    monkeypatch.setenv("TRANSFORMERLENS_ALLOW_MPS", allow)
    assert default_device() == get_device() == expected
    assert placement_kwargs(None, None, None, None, None) == {"device": expected}
    assert placement_kwargs("cpu", None, None, None, None) == {"device": "cpu"}  # override


# ---- nnsight -------------------------------------------------------------------------------

def test_nnsight_on_the_bridge(pair):
    """``NNsight(model.bridge)`` traces the same computation; ``NNsight(model)`` does not work
    (HookedModel is not a torch module; documented in docs/interop.md)."""
    from nnsight import NNsight

    _, model = pair
    tokens = model.to_tokens(TEXTS)
    traced = NNsight(model.bridge)
    with traced.trace(tokens):
        z = traced.blocks[1].attn.hook_z.output.save()
        logits = traced.output.save()
    with torch.no_grad():
        ref_logits, cache = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z"])
    assert_close(logits, ref_logits, rtol=0, atol=0)
    # nnsight sees the module's raw tensor: heads flattened, [batch, pos, head * d_head]
    assert z.shape == (*tokens.shape, model.n_heads * model.d_head)
    assert_close(z.reshape(*tokens.shape, model.n_heads, model.d_head),
                 cache["blocks.1.attn.hook_z"], rtol=0, atol=0)
    with pytest.raises((AttributeError, TypeError)):
        NNsight(model)
