"""Names for the ``>>>`` examples in the docstrings of ``mechicl`` (``pytest --doctest-modules``).

Every doctest sees ``torch``, ``mechicl``, ``model`` (a tiny random Llama-like model with
grouped-query attention and the toy word tokenizer ``w0 ... w95``, see :mod:`mechicl.testing`)
and ``pairs`` (two repeated-token prompt pairs for it). They are built once per session, and only
when a doctest runs: the fixtures of the test suite are in ``tests/conftest.py``. Doctests never
load the real default model (SmolLM2-135M) and never contact the Hugging Face hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402


@pytest.fixture(scope="session")
def _doctest_names():
    import torch

    import mechicl
    from mechicl.model import as_hooked_model
    from mechicl.testing import tiny_model

    model = as_hooked_model(tiny_model("llama"), name="tiny-llama")
    pairs = mechicl.make_pairs("repeated_tokens", model, n=2)
    return {"torch": torch, "mechicl": mechicl, "model": model, "pairs": pairs}


@pytest.fixture(autouse=True)
def _add_doctest_names(request, doctest_namespace):
    """Fill the doctest namespace (doctests only; other tests do not build the tiny model), and
    run doctests on one thread: tiny models gain nothing from more."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    import torch

    doctest_namespace.update(request.getfixturevalue("_doctest_names"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
