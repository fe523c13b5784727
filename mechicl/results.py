"""Result containers for per-head scores: frozen dataclasses with DataFrames, save and load.

Results are stored as a folder holding ``tensors.safetensors`` (the numbers) and ``meta.json``
(name, protocol parameters, model provenance), written atomically. Never pickle.

Axis names: ``seed layer head pos``.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechicl._batching import pad_right
from mechicl._io import atomic_path

__all__ = ["HeadScores", "LayerScores", "unpad_sequences"]

FORMAT_VERSION = 1


def unpad_sequences(tokens: Tensor, lengths: Tensor) -> list[Tensor]:
    """Inverse of :func:`mechicl._batching.pad_right`."""
    return [tokens[i, : int(n)].clone() for i, n in enumerate(lengths.tolist())]


def _seed_stats(per_seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(per_seed as float64 on CPU, mean over seeds, unbiased variance; zeros for one seed)."""
    per_seed = per_seed.detach().to("cpu", torch.float64)
    var = per_seed.var(0) if per_seed.shape[0] > 1 else torch.zeros_like(per_seed[0])
    return per_seed, per_seed.mean(0), var


def _write_folder(path: str | os.PathLike[str], kind: str, name: str, params: dict[str, Any],
                  model: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """A result folder: ``tensors.safetensors`` + ``meta.json``, written atomically."""
    meta = {"format": FORMAT_VERSION, "kind": kind, "name": name, "params": params,
            "model": model}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "tensors.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True),
                                       encoding="utf-8")
    return Path(path)


def _read_folder(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, Any],
                                                                   dict[str, Tensor]]:
    """(meta, tensors) of a folder written by :func:`_write_folder`; checks its kind."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise ValueError(f"{path} does not hold {kind} (kind={meta.get('kind')!r})")
    return meta, load_file(str(path / "tensors.safetensors"))


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
        """Write the result as a folder (``tensors.safetensors`` + ``meta.json``), atomically."""
        tensors = {"mean": self.mean, "var": self.var, "per_seed": self.per_seed}
        if self.tokens:
            tokens, lengths = pad_right(self.tokens)
            tensors |= {"tokens": tokens, "token_lengths": lengths}
        for key, value in self.extras.items():
            tensors[f"extra.{key}"] = value
        return _write_folder(path, "HeadScores", self.name, self.params, self.model, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "HeadScores":
        """Read a result written by :meth:`save`."""
        meta, t = _read_folder(path, "HeadScores")
        tokens = unpad_sequences(t["tokens"], t["token_lengths"]) if "tokens" in t else []
        extras = {k.removeprefix("extra."): v for k, v in t.items() if k.startswith("extra.")}
        return cls(name=meta["name"], mean=t["mean"], var=t["var"], per_seed=t["per_seed"],
                   params=meta["params"], model=meta["model"], tokens=tokens, extras=extras)


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
        """Write as a folder (``tensors.safetensors`` + ``meta.json``), atomically."""
        return _write_folder(path, "LayerScores", self.name, self.params, self.model,
                             {"mean": self.mean, "var": self.var, "per_seed": self.per_seed})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "LayerScores":
        meta, t = _read_folder(path, "LayerScores")
        return cls(name=meta["name"], mean=t["mean"], var=t["var"], per_seed=t["per_seed"],
                   params=meta["params"], model=meta["model"])
