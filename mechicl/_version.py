"""The package version and the project's addresses (one definition each: ``mechicl.__version__``
re-exports the version; pyproject.toml's ``[project.urls]`` repeats the addresses)."""

__version__ = "0.2.0"

HOMEPAGE = "https://github.com/mechicl/mechicl"
"""The project's source repository."""

DOCS_URL = "https://mechicl.readthedocs.io/en/latest/"
"""The documentation site (built from docs/ by ``make docs``); help texts link to its pages
with :func:`docs_url`."""


def docs_url(page: str = "") -> str:
    """The address of a documentation page, e.g. ``docs_url("concepts/report/")``."""
    return DOCS_URL + page.lstrip("/")
