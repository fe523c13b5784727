"""The package version (one definition: ``mechicl.__version__`` re-exports it)."""

__version__ = "0.2.0"
