"""Results: one folder protocol for every result type, a registry of result types, and
:func:`load_result`; plus the per-head and per-layer score containers the analyses share.

Every result type (:class:`HeadScores`, :class:`LayerScores`,
:class:`~mechicl.analyses.evaluation.EvalResult`, :class:`~mechicl.analyses.pruning.PruneCurve`,
:class:`~mechicl.analyses.patching.PatchResult`, :class:`~mechicl.analyses.induction.ScanResult`,
:class:`~mechicl.analyses.overlap.OverlapTable`, :class:`~mechicl.report.build.Report`) is a
frozen dataclass with the provenance fields ``params`` (the protocol: what was computed, enough
to compute it again) and ``model`` (:meth:`~mechicl.model.hooked.HookedModel.info`: name,
weights and tokenizer hashes, dtype, shape, package versions), and is saved as one folder::

    result.json            {"format", "kind", "params", "model", "fields", "files", "parts",
                            "pages" (if any), "checksum"}
    tensors.safetensors    the tensors (if any)
    <name>.parquet         each table (if any)
    <part>/                sub-results, each a result folder of its own (if any)

written atomically (a reader never sees a half-written folder; never pickle). ``files`` holds
the sha256 of every data file, ``pages`` that of every further file (a report's pages and
figures), and ``checksum`` that of ``result.json``'s own content, so
:func:`read_result` detects a truncated or corrupted file, an edited number or an unknown
format version, and says which file. :func:`load_result` reads any result folder back as its
type, dispatching on ``kind`` through :data:`RESULT_TYPES` (types register with
:func:`result_type`).

Axis names: ``seed layer head pos``.
"""

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechicl._batching import pad_right
from mechicl._io import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "RESULT_TYPES",
    "HeadScores",
    "LayerScores",
    "ResultFolder",
    "ResultError",
    "load_result",
    "read_result",
    "result_type",
    "unpad_sequences",
    "verify_result",
    "write_result",
]

FORMAT_VERSION = 2
"""The version of the result folder protocol written by this mechicl."""
META_FILE = "result.json"
TENSORS_FILE = "tensors.safetensors"

RESULT_TYPES: dict[str, type] = {}
"""Result type by ``kind`` (the class name), for :func:`load_result`."""

T = TypeVar("T", bound=type)


class ResultError(ValueError):
    """A result folder that cannot be trusted: missing, corrupt, edited, of an unknown format
    version or of another kind than expected. The message names the file."""


def result_type(cls: T) -> T:
    """Class decorator: register a result type under its class name (its ``kind``). The class
    has ``save(path)`` and a classmethod ``load(path)``; a name already taken is an error."""
    kind = cls.__name__
    if kind in RESULT_TYPES and RESULT_TYPES[kind] is not cls:
        raise ValueError(f"a result type named {kind!r} is already registered")
    RESULT_TYPES[kind] = cls
    return cls


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(meta: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":"), allow_nan=True)


def write_result(path: str | os.PathLike[str], *, kind: str, params: Mapping[str, Any],
                 model: Mapping[str, Any], fields: Mapping[str, Any] | None = None,
                 tensors: Mapping[str, Tensor] | None = None,
                 tables: Mapping[str, pd.DataFrame] | None = None,
                 parts: Mapping[str, Any] | None = None,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write one result folder (see the module docstring), atomically.

    Args:
        path: the folder (replaced if it exists).
        kind: the result type's name.
        params: the protocol parameters (JSON).
        model: the model's provenance (JSON).
        fields: further scalar fields of the result (JSON), e.g. an accuracy.
        tensors: named tensors (saved in one safetensors file, on CPU, contiguous).
        tables: named DataFrames (one parquet file each, without the index; a name may
            have one folder, e.g. ``tables/accuracy``).
        parts: named sub-results (anything with ``save(path)``), one subfolder each.
        extra: writes further files into the folder (e.g. a report's pages); their sha256
            is recorded under ``pages`` (checked on load like the data files).
    """
    with atomic_path(path) as tmp:
        tmp.mkdir()
        files = []
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / TENSORS_FILE))
            files.append(TENSORS_FILE)
        for name, table in (tables or {}).items():
            (tmp / f"{name}.parquet").parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(tmp / f"{name}.parquet", index=False)
            files.append(f"{name}.parquet")
        part_kinds = {}
        for name, part in (parts or {}).items():
            part.save(tmp / name)
            part_kinds[name] = type(part).__name__
        pages: list[str] = []
        if extra is not None:
            known = set(files)
            extra(tmp)
            pages = [rel for p in sorted(tmp.rglob("*")) if p.is_file()
                     and (rel := p.relative_to(tmp).as_posix()) not in known
                     and not any(rel.startswith(f"{part}/") for part in part_kinds)]
        meta: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind, "params": dict(params),
                                "model": dict(model), "fields": dict(fields or {}),
                                "files": {f: _sha256(tmp / f) for f in files},
                                "parts": part_kinds}
        if pages:  # only results with pages have the field: other results' bytes are unchanged
            meta["pages"] = {f: _sha256(tmp / f) for f in pages}
        meta["checksum"] = hashlib.sha256(_canonical(meta).encode()).hexdigest()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True),
                                     encoding="utf-8")
    return Path(path)


@dataclass(frozen=True)
class ResultFolder:
    """A verified result folder, read by :func:`read_result`.

    Attributes:
        path: the folder.
        meta: ``result.json``.
        tensors: the tensors by name.
        tables: the tables by name.
    """

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    tables: dict[str, pd.DataFrame]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def params(self) -> dict[str, Any]:
        return self.meta["params"]

    @property
    def model(self) -> dict[str, Any]:
        return self.meta["model"]

    @property
    def fields(self) -> dict[str, Any]:
        return self.meta["fields"]

    def part(self, name: str) -> Path:
        """The folder of the sub-result ``name``."""
        if name not in self.meta["parts"]:
            raise ResultError(f"{self.path} has no part {name!r}; it has "
                              f"{sorted(self.meta['parts'])}")
        return self.path / name


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``result.json`` of a result folder, checked: it exists, parses, has a known format
    version and its checksum matches (the data files are not read)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        legacy = [n for n in ("meta.json", "curve.json") if (path / n).is_file()]
        hint = (f" (it has {legacy[0]}: a result of mechicl < 0.2; convert it with "
                "scripts/migrate_results.py)") if legacy else ""
        raise ResultError(f"{path} is not a result folder: no {META_FILE}{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultError(f"{meta_path} is not valid JSON ({err}); the result is corrupt: "
                          "recompute it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ResultError(f"{meta_path}: format {found!r} is not {FORMAT_VERSION}, the result "
                          "format this mechicl reads")
    if meta.get("checksum") != hashlib.sha256(_canonical(meta).encode()).hexdigest():
        raise ResultError(f"{meta_path}: checksum mismatch (the file was edited or is "
                          "corrupt); recompute the result")
    return meta


def read_result(path: str | os.PathLike[str], kind: str | None = None) -> ResultFolder:
    """Read and verify a result folder written by :func:`write_result`: format version, every
    file's checksum and (if given) its ``kind``.

    Raises:
        ResultError: the folder is missing, corrupt, edited, of another format version or of
            another kind (the message names the file).
    """
    path = Path(path)
    meta = read_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise ResultError(f"{path} holds a {meta['kind']}, not a {kind}")
    _check_files(path, meta)
    tensors: dict[str, Tensor] = {}
    tables: dict[str, pd.DataFrame] = {}
    for name in meta["files"]:
        file = path / name
        try:
            if name == TENSORS_FILE:
                tensors = load_file(str(file))
            elif name.endswith(".parquet"):
                tables[name.removesuffix(".parquet")] = pd.read_parquet(file)
        except Exception as err:  # noqa: BLE001 - any reader error means an unreadable file
            raise ResultError(f"{file} cannot be read ({type(err).__name__}: {err}); the result "
                              "is corrupt: recompute it") from None
    return ResultFolder(path=path, meta=meta, tensors=tensors, tables=tables)


def _check_files(path: Path, meta: Mapping[str, Any]) -> None:
    """Every data file and page of ``meta`` exists and has its recorded sha256."""
    for name, digest in {**meta.get("pages", {}), **meta["files"]}.items():
        file = path / name
        if not file.is_file():
            raise ResultError(f"{file} is missing; the result is incomplete: recompute it")
        if _sha256(file) != digest:
            raise ResultError(f"{file}: checksum mismatch (truncated, corrupt or edited); "
                              "recompute the result")


def verify_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a result folder and, recursively, its parts without loading them: format
    version, ``result.json``'s checksum, every data file's and page's checksum, each part's
    kind. Returns ``result.json``.

    Raises:
        ResultError: something is missing, corrupt, edited or of another format (the message
            names the file).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = HeadScores.from_per_seed("demo", torch.ones(2, 3, 4)).save(Path(tmp) / "d")
    ...     verify_result(folder)["kind"]
    'HeadScores'
    """
    path = Path(path)
    meta = read_meta(path)
    _check_files(path, meta)
    for name, kind in meta["parts"].items():
        if verify_result(path / name)["kind"] != kind:
            raise ResultError(f"{path / name} is not the {kind} that {path / META_FILE} names")
    return meta


def load_result(path: str | os.PathLike[str]) -> Any:
    """Load any result folder as its type (dispatching on ``kind`` through
    :data:`RESULT_TYPES`), verified (:func:`read_result`). A stored job of the result store
    (a folder with ``job.json`` and ``result/``) loads its result.

    >>> import tempfile
    >>> scores = HeadScores.from_per_seed("demo", torch.ones(2, 3, 4))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     back = load_result(scores.save(Path(tmp) / "demo"))
    >>> type(back).__name__, back.mean.shape
    ('HeadScores', torch.Size([3, 4]))
    """
    path = Path(path)
    if (path / "job.json").is_file() and (path / "result").is_dir():
        path = path / "result"
    kind = read_meta(path)["kind"]
    if kind not in RESULT_TYPES:
        raise ResultError(f"{path}: unknown result kind {kind!r}; known: {sorted(RESULT_TYPES)}")
    return RESULT_TYPES[kind].load(path)


def unpad_sequences(tokens: Tensor, lengths: Tensor) -> list[Tensor]:
    """Inverse of :func:`mechicl._batching.pad_right`."""
    return [tokens[i, : int(n)].clone() for i, n in enumerate(lengths.tolist())]


def _seed_stats(per_seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(per_seed as float64 on CPU, mean over seeds, unbiased variance; zeros for one seed)."""
    per_seed = per_seed.detach().to("cpu", torch.float64)
    var = per_seed.var(0) if per_seed.shape[0] > 1 else torch.zeros_like(per_seed[0])
    return per_seed, per_seed.mean(0), var


@result_type
@dataclass(frozen=True, kw_only=True)
class HeadScores:
    """One score for every attention head (query heads for GQA models).

    Attributes:
        name: the score's name, e.g. ``"prefix_matching"``.
        mean: ``[layer, head]`` mean over seeds.
        var: ``[layer, head]`` unbiased variance over seeds (zeros for one seed or for scores
            computed from weights alone).
        per_seed: ``[seed, layer, head]`` the score for each seed's sequence.
        params: the protocol parameters (JSON-serialisable), enough to regenerate the inputs.
        model: the model's provenance (:meth:`mechicl.HookedModel.info`).
        tokens: the input token sequences, one 1-d tensor per seed (empty for weight-based
            scores), so that scores can be recomputed on identical inputs elsewhere.
        extras: further named tensors (e.g. per-position losses).
    """

    name: str
    mean: Float[Tensor, "layer head"]
    var: Float[Tensor, "layer head"]
    per_seed: Float[Tensor, "seed layer head"]
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    tokens: list[Int[Tensor, " _pos"]] = field(default_factory=list)  # lengths differ
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_per_seed(cls, name: str, per_seed: Float[Tensor, "seed layer head"],
                      **kwargs: Any) -> "HeadScores":
        """Build from per-seed scores: mean and unbiased variance over the seed axis."""
        per_seed, mean, var = _seed_stats(per_seed)
        return cls(name=name, mean=mean, var=var, per_seed=per_seed, **kwargs)

    @property
    def n_layers(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.mean.shape[1])

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        """The ``k`` highest-scoring heads as ``(layer, head)``, best first."""
        if not 1 <= k <= self.mean.numel():
            raise ValueError(f"k={k} must be in 1..{self.mean.numel()}")
        flat = torch.argsort(self.mean.flatten(), descending=True, stable=True)[:k]
        return [(int(i) // self.n_heads, int(i) % self.n_heads) for i in flat]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head: layer, head, mean, var, std, rank (1 = highest mean)."""
        layer, head = torch.meshgrid(torch.arange(self.n_layers), torch.arange(self.n_heads),
                                     indexing="ij")
        mean = self.mean.flatten()
        rank = torch.empty_like(mean, dtype=torch.long)
        rank[torch.argsort(mean, descending=True, stable=True)] = torch.arange(1, mean.numel() + 1)
        return pd.DataFrame({
            "score": self.name,
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "mean": mean.numpy(),
            "var": self.var.flatten().numpy(),
            "std": self.var.flatten().sqrt().numpy(),
            "rank": rank.numpy(),
        })

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as a folder (:func:`write_result`), atomically."""
        tensors = {"mean": self.mean, "var": self.var, "per_seed": self.per_seed}
        if self.tokens:
            tokens, lengths = pad_right(self.tokens)
            tensors |= {"tokens": tokens, "token_lengths": lengths}
        for key, value in self.extras.items():
            tensors[f"extra.{key}"] = value
        return write_result(path, kind="HeadScores", params=self.params, model=self.model,
                            fields={"name": self.name}, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "HeadScores":
        """Read a result written by :meth:`save`."""
        folder = read_result(path, "HeadScores")
        t = folder.tensors
        tokens = unpad_sequences(t["tokens"], t["token_lengths"]) if "tokens" in t else []
        extras = {k.removeprefix("extra."): v for k, v in t.items() if k.startswith("extra.")}
        return cls(name=folder.fields["name"], mean=t["mean"], var=t["var"],
                   per_seed=t["per_seed"], params=folder.params, model=folder.model,
                   tokens=tokens, extras=extras)


@result_type
@dataclass(frozen=True, kw_only=True)
class LayerScores:
    """One score per layer (e.g. the importance of each layer's MLP).

    Attributes:
        name: the score's name, e.g. ``"ffn_importance"``.
        mean: ``[layer]`` mean over seeds / examples.
        var: ``[layer]`` unbiased variance over seeds / examples.
        per_seed: ``[seed, layer]`` one row per seed or example.
        params: the protocol parameters (JSON-serialisable).
        model: the model's provenance.
    """

    name: str
    mean: Float[Tensor, " layer"]
    var: Float[Tensor, " layer"]
    per_seed: Float[Tensor, "seed layer"]
    params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_per_seed(cls, name: str, per_seed: Float[Tensor, "seed layer"],
                      **kwargs: Any) -> "LayerScores":
        per_seed, mean, var = _seed_stats(per_seed)
        return cls(name=name, mean=mean, var=var, per_seed=per_seed, **kwargs)

    @property
    def n_layers(self) -> int:
        return int(self.mean.shape[0])

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer: layer, mean, var, std, rank (1 = highest mean)."""
        rank = torch.empty_like(self.mean, dtype=torch.long)
        rank[torch.argsort(self.mean, descending=True, stable=True)] = torch.arange(
            1, self.n_layers + 1)
        return pd.DataFrame({"score": self.name, "layer": range(self.n_layers),
                             "mean": self.mean.numpy(), "var": self.var.numpy(),
                             "std": self.var.sqrt().numpy(), "rank": rank.numpy()})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as a folder (:func:`write_result`), atomically."""
        return write_result(path, kind="LayerScores", params=self.params, model=self.model,
                            fields={"name": self.name},
                            tensors={"mean": self.mean, "var": self.var,
                                     "per_seed": self.per_seed})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LayerScores":
        """Read a result written by :meth:`save`, verified
        (:func:`~mechicl.results.read_result`)."""
        folder = read_result(path, "LayerScores")
        t = folder.tensors
        return cls(name=folder.fields["name"], mean=t["mean"], var=t["var"],
                   per_seed=t["per_seed"], params=folder.params, model=folder.model)
