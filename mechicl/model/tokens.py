"""Token frequency rankings, for the random-token protocols of induction-head scans.

Bansal et al. (2023) and Olsson et al. (2022) draw random tokens from the middle of a
vocabulary's frequency ranking (excluding the most and least frequent few percent), so that the
sequences are neither dominated by function words nor by junk tokens. Tokenizers rarely ship
counts, so the ranking is read off the tokenizer itself:

* **BPE** (GPT-2, Llama-3, SmolLM2, ...): merge rank. BPE learns merges greedily by pair
  frequency, so a token created by an earlier merge is more frequent. Base-alphabet tokens (no
  merge creates them) come first, in vocabulary order, then merge products in merge order.
* **Unigram / SentencePiece** (T5, Gemma ...): the piece scores (log-probabilities of the unigram
  language model), highest first.
* **Anything else** (WordPiece, WordLevel): a documented fallback, vocabulary id order, with a
  warning: for most such vocabularies ids follow frequency only roughly.

Special tokens (added tokens flagged special and the tokenizer's special ids) are excluded.

Axis names: ``n_tokens``.
"""

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["FrequencyRanking", "frequency_ranking"]

RankingMethod = Literal["bpe-merges", "unigram-scores", "vocab-order"]


@dataclass(frozen=True, kw_only=True)
class FrequencyRanking:
    """Token ids from most to least frequent, special tokens excluded.

    Attributes:
        token_ids: ``[n_tokens]`` ids, most frequent first.
        method: how the ranking was obtained (see the module docstring).
    """

    token_ids: Int[Tensor, " n_tokens"]
    method: RankingMethod

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def middle(self, exclude_top: float = 0.04,
               exclude_bottom: float = 0.04) -> Int[Tensor, " n_kept"]:
        """The ranking without its most frequent ``exclude_top`` and least frequent
        ``exclude_bottom`` fractions (Bansal et al. exclude 4% at each end).

        >>> r = FrequencyRanking(token_ids=torch.arange(100), method="vocab-order")
        >>> r.middle(0.1, 0.2).tolist() == list(range(10, 80))
        True
        """
        for label, frac in (("exclude_top", exclude_top), ("exclude_bottom", exclude_bottom)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{label}={frac!r} must be a fraction in [0, 1)")
        if exclude_top + exclude_bottom >= 1.0:
            raise ValueError(f"exclude_top + exclude_bottom = {exclude_top + exclude_bottom} "
                             "leaves no tokens; their sum must be below 1")
        n = len(self)
        start = int(n * exclude_top)
        stop = n - int(n * exclude_bottom)
        return self.token_ids[start:stop]


def _special_ids(tokenizer: Any, spec: dict[str, Any]) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    ids |= {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
    return ids


def _merge_products(merges: list[Any]) -> list[str]:
    products = []
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        products.append(left + right)
    return products


def frequency_ranking(tokenizer: Any) -> FrequencyRanking:
    """Rank a (fast) Hugging Face tokenizer's tokens by frequency; see the module docstring.

    Args:
        tokenizer: a ``transformers`` fast tokenizer (with a ``tokenizers`` backend).

    Returns:
        A :class:`FrequencyRanking` over all non-special tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend; "
                        "mechicl needs a fast tokenizer to rank tokens")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    special = _special_ids(tokenizer, spec)
    kind = model.get("type")

    if kind == "BPE":
        vocab: dict[str, int] = model["vocab"]
        merge_rank: dict[int, int] = {}
        for rank, product in enumerate(_merge_products(model.get("merges", []))):
            token_id = vocab.get(product)
            if token_id is not None and token_id not in merge_rank:
                merge_rank[token_id] = rank
        alphabet = sorted(i for i in vocab.values() if i not in merge_rank)
        merged = sorted(merge_rank, key=merge_rank.__getitem__)
        order = alphabet + merged
        method: RankingMethod = "bpe-merges"
    elif kind == "Unigram":
        pieces = model["vocab"]  # [[piece, score], ...] in id order
        scores = torch.tensor([float(score) for _, score in pieces], dtype=torch.float64)
        order = torch.sort(-scores, stable=True).indices.tolist()
        method = "unigram-scores"
    else:
        logger.warning("Tokenizer model %r has no frequency information: ranking tokens by "
                       "vocabulary id (documented fallback)", kind)
        order = sorted(tokenizer.get_vocab().values())
        method = "vocab-order"

    kept = [i for i in order if i not in special]
    return FrequencyRanking(token_ids=torch.tensor(kept, dtype=torch.long), method=method)
