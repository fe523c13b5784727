"""oneDNN's kernel on packed weights (mechicl.model.kernels) against ``F.linear``, the slow and
obviously-correct reference: the products, their gradients, weights changed in place, whole
models (tiny and the default), and the choice of kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mechicl.analyses.evaluation import masked_choice_logprobs
from mechicl.analyses.importance import head_importance
from mechicl.inputs.tasks import build_prompts, load_task
from mechicl.model import Mask, as_hooked_model, kernels, load_model, pruned
from mechicl.model.kernels import (
    BUCKET_ROWS,
    PackedForward,
    choose_linear_kernel,
    pack_weight,
    packable_linears,
    packed_kernel_available,
    packed_linear,
)
from mechicl.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernel = pytest.mark.skipif(not packed_kernel_available(torch.zeros(1)),
                                  reason="this PyTorch build has no oneDNN packed linear kernel")


@needs_kernel
@pytest.mark.parametrize("rows", [1, BUCKET_ROWS - 1, BUCKET_ROWS, BUCKET_ROWS + 1, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_equal_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(48, 40, generator=g), torch.randn(2, rows, 40, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    out = packed_linear(x, pack_weight(w), b)
    assert out.shape == (2, rows, 48)
    assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gradients_flow_to_the_input_and_to_a_weight_that_needs_them():
    layer = torch.nn.Linear(24, 16)
    layer.requires_grad_(False)
    layer.forward = PackedForward(layer)
    x = torch.randn(3, 5, 24, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    (F.linear(ref, layer.weight, layer.bias) ** 2).sum().backward()
    assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    # a weight that needs a gradient gets it (the layer runs F.linear under autograd)
    layer.weight.requires_grad_(True)
    (layer(x.detach()) ** 2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@needs_kernel
def test_a_weight_changed_in_place_is_packed_again():
    layer = torch.nn.Linear(8, 6, bias=False)
    layer.forward = forward = PackedForward(layer)
    x = torch.randn(4, 8)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(2.0)  # the version counter moves
        assert_close(layer(x), 2 * first, rtol=1e-5, atol=1e-5)
        layer.weight.data.mul_(0.5)  # .data: the counter does not move; invalidate() says it
        forward.invalidate()
        assert_close(layer(x), first, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_deep_copy_runs_on_its_own_weights():
    import copy

    layer = torch.nn.Linear(8, 6)
    layer.forward = PackedForward(layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = layer(x)
        twin = copy.deepcopy(layer)
        assert twin.forward.module is twin and torch.equal(twin(x), expected)
        twin.weight.zero_()
        assert torch.equal(layer(x), expected)
        assert_close(twin(x), twin.bias.expand(3, 6), rtol=0, atol=1e-6)


def tiny_llama():
    return as_hooked_model(tiny_model("llama", n_layers=3))


@needs_kernel
def test_a_tiny_model_on_packed_weights_equals_it_on_f_linear():
    model = tiny_llama()
    tokens = torch.randint(4, 100, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens, return_type="logits")
        assert model.use_linear_kernel("packed") == "packed" == model.linear_kernel
        packed, cache = model.run_with_cache(tokens, return_type="logits")
        assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        assert cache["blocks.1.attn.hook_z"].shape[:2] == (3, 37)  # hooks still fire
        assert model.use_linear_kernel("plain") == "plain" == model.linear_kernel
        assert torch.equal(model(tokens, return_type="logits"), plain)  # nn.Linear's own again
    assert all("forward" not in m.__dict__ for m in packable_linears(model.bridge.original_model))


@needs_kernel
def test_masked_scoring_and_gradient_importance_on_packed_weights():
    model = tiny_llama()
    task = load_task("antonyms")
    prompts = build_prompts(task, shots=1, n=6, seed=0)
    masks = [Mask.remove(model, heads=[(1, 0)]), Mask.remove(model, ffns=[0])]
    plain_ll = masked_choice_logprobs(model, prompts, masks)[0]
    plain_imp = head_importance(model, prompts=prompts, method="bansal").mean
    model.use_linear_kernel("packed")
    assert_close(masked_choice_logprobs(model, prompts, masks)[0], plain_ll,
                 rtol=1e-5, atol=1e-5)
    assert_close(head_importance(model, prompts=prompts, method="bansal").mean, plain_imp,
                 rtol=1e-4, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_in_place_reaches_the_packed_weights(method):
    """Wanda prunes layer by layer with calibration passes between: the packed copies must
    follow every change, and the restore."""
    plain, packed = tiny_llama(), tiny_llama()
    packed.use_linear_kernel("packed")
    tokens = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    calibration = torch.cat([torch.zeros(4, 1, dtype=torch.long),
                             torch.randint(4, 100, (4, 15), generator=torch.Generator())], 1)
    options = {"calibration": calibration} if method == "wanda" else {}
    with torch.no_grad():
        before = packed(tokens, return_type="logits")
        with pruned(plain, 0.5, method, **options), pruned(packed, 0.5, method, **options):
            assert_close(packed(tokens, return_type="logits"),
                         plain(tokens, return_type="logits"), rtol=1e-5, atol=1e-5)
        assert_close(packed(tokens, return_type="logits"), before, rtol=0, atol=0)


def test_a_changed_weight_through_weights_changed_drops_the_packed_copies():
    model = tiny_llama()
    if packed_kernel_available(torch.zeros(1)):
        model.use_linear_kernel("packed")
    layer = packable_linears(model.bridge.original_model)[0]
    tokens = torch.randint(4, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(tokens, return_type="logits")
        layer.weight.data.zero_()  # unseen by the version counter
        model.weights_changed()
        after = model(tokens, return_type="logits")
        model.use_linear_kernel("plain")
        assert_close(after, model(tokens, return_type="logits"), rtol=1e-5, atol=1e-5)


def test_auto_packs_only_where_it_measures_faster_and_fits(monkeypatch):
    hf = tiny_llama().bridge.original_model
    if not packed_kernel_available(torch.zeros(1)):
        kernel, info = choose_linear_kernel(hf, "auto")
        assert kernel == "plain" and "reason" in info
        return
    monkeypatch.setattr(kernels, "cpu_packed_speedup", lambda: 2.0)
    kernel, info = choose_linear_kernel(hf, "auto")
    assert kernel == "packed" and info["speedup"] == 2.0
    assert info["copies_bytes"] == sum(m.weight.numel() * 4 for m in packable_linears(hf))
    monkeypatch.setattr(kernels, "cpu_packed_speedup", lambda: 1.1)
    assert choose_linear_kernel(hf, "auto")[0] == "plain"
    monkeypatch.setattr(kernels, "cpu_packed_speedup", lambda: 2.0)
    monkeypatch.setattr(kernels, "available_memory", lambda: info["copies_bytes"])  # 4x short
    assert choose_linear_kernel(hf, "auto")[0] == "plain"


def test_the_unembedding_and_embeddings_are_not_packed():
    model = tiny_llama()
    hf = model.bridge.original_model
    linears = packable_linears(hf)
    assert len(linears) == 3 * 7  # q k v o gate up down per block
    assert all(m.out_features != model.d_vocab for m in linears)


def test_packing_that_does_not_apply_says_why():
    bf16 = as_hooked_model(tiny_model("llama").to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"linear_kernel='packed' does not apply.*bfloat16"):
        bf16.use_linear_kernel("packed")
    assert bf16.use_linear_kernel("auto") == "plain"
    assert "float32" in bf16.linear_kernel_info["reason"]
    with pytest.raises(ValueError, match=r"linear_kernel='fast' is not allowed.*'auto'"):
        tiny_llama().use_linear_kernel("fast")
    with pytest.raises(ValueError, match=r"linear_kernel='fast' is not allowed"):
        load_model("no-such-model", linear_kernel="fast")  # before anything is loaded


@needs_kernel
def test_the_default_model_scores_the_same_on_packed_weights(smollm2):
    """SmolLM2 (Q4_1 weights dequantised to float32): log-likelihoods within 1e-4 and the same
    predictions, unmasked and masked, packed against F.linear."""
    before = smollm2.linear_kernel
    masks = [Mask.remove(smollm2, heads=[(3, 0), (7, 2)]), Mask.remove(smollm2, ffns=[5])]
    try:
        for task, shots in [("country_capital", 5), ("antonyms", 0), ("sentiment", 1)]:
            prompts = build_prompts(load_task(task), shots=shots, n=6, seed=0)
            out = {}
            for kernel in ("plain", "packed"):
                smollm2.use_linear_kernel(kernel)
                out[kernel] = masked_choice_logprobs(smollm2, prompts, masks)[0]
            assert_close(out["packed"], out["plain"], rtol=0, atol=1e-4)
            assert torch.equal(out["packed"].argmax(-1), out["plain"].argmax(-1))
    finally:
        smollm2.use_linear_kernel(before)


@needs_kernel
def test_the_memory_estimate_counts_the_packed_copies():
    from mechicl.experiments.memory import KERNEL_STATE_PER_WIDTH, ModelShape, estimate_memory

    model = tiny_llama()
    options = {"batch_tokens": 256, "seq_len": 64, "analysis": "choices"}
    plain = estimate_memory(model, **options)
    model.use_linear_kernel("packed")
    packed = estimate_memory(model, **options)
    copies = sum(m.weight.numel() * 4 for m in packable_linears(model.bridge.original_model))
    assert packed.weights == plain.weights + copies
    # oneDNN's per-width state: widths 64, 128, 192, 256 for a pass of 256 tokens, an output
    # buffer per width of q (64), k/v (32), o (64), gate/up (d_mlp) and down (64), and a fixed
    # part per width and projection
    d_mlp = model.bridge.original_model.config.intermediate_size
    assert packed.kernel_state == (4 * (64 + 128 + 192 + 256) * (64 + 32 + 2 * 64 + d_mlp)
                                   + 4 * 5 * KERNEL_STATE_PER_WIDTH)
    assert packed.total == plain.total + copies + packed.kernel_state
    assert packed.batch_bytes == plain.batch_bytes  # the pass itself is the same
    # from the shape alone, as for a model that is not loaded
    shape = estimate_memory(ModelShape.from_model(model), linear_kernel="packed", **options)
    assert shape.to_dict() == packed.to_dict()
    with pytest.raises(ValueError, match="linear_kernel"):
        estimate_memory(model, linear_kernel="fast", **options)


@needs_kernel
def test_the_copies_are_made_when_the_kernel_is_set_not_at_first_use():
    model = tiny_llama()
    model.use_linear_kernel("packed")
    forwards = [m.forward for m in packable_linears(model.bridge.original_model)]
    assert all(isinstance(f, PackedForward) and f.packed is not None for f in forwards)
