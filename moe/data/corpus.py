"""The embedded default corpus: standard-library source files fixed by a manifest.

The corpus used when data.paths is empty is the installed Python's standard library, which
changes between Python releases. So that the main job reads the same documents on any
Python it supports, stdlib_corpus.tsv names the files that were byte-identical in the
standard libraries of several Python versions, each with its SHA-256. Training reads those
files from the installed standard library and checks each hash first: a missing or changed
file is reported (data.corpus_check=warn, the default) or refused (strict), because the run's
data, and so its numbers, then differ from the documented ones.

Regenerate the manifest from several interpreters' standard libraries with
`python -m moe.data.corpus STDLIB_DIR [STDLIB_DIR ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import platform
import sys
import sysconfig
from pathlib import Path

MANIFEST = Path(__file__).with_name("stdlib_corpus.tsv")


class CorpusError(ValueError):
    """The embedded corpus cannot be read as its manifest names it; the message says why."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(path: Path) -> list[tuple[str, str]]:
    """[(relative path, sha256)] in manifest order; '#' lines are comments."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, relative = line.partition("\t")
        if len(digest) != 64 or not relative:
            raise CorpusError(f"{path}:{number}: expected 'SHA256<TAB>relative path', got {line!r}")
        entries.append((relative, digest))
    if not entries:
        raise CorpusError(f"{path} names no files")
    return entries


def check(root: Path, entries: list[tuple[str, str]]) -> tuple[list[Path], list[str], list[str]]:
    """(the listed files present under root, relative paths whose hash differs, those missing)."""
    present, changed, missing = [], [], []
    for relative, digest in entries:
        path = root / relative
        if not path.is_file():
            missing.append(relative)
            continue
        present.append(path)
        if sha256(path) != digest:
            changed.append(relative)
    return present, changed, missing


def embedded_files(corpus_check: str = "warn", root: Path | None = None, manifest: Path | None = None) -> list[Path]:
    """The corpus files named by the manifest, under the installed standard library (or
    root); a missing or changed file is logged (warn) or refused (strict)."""
    root = stdlib_root() if root is None else root
    manifest = MANIFEST if manifest is None else manifest
    entries = read_manifest(manifest)
    present, changed, missing = check(root, entries)
    if changed or missing:
        examples = ", ".join((changed + missing)[:3])
        message = (
            f"the embedded corpus differs from its manifest {manifest.name}: {len(changed)} files changed and "
            f"{len(missing)} missing of {len(entries)} in the standard library of Python "
            f"{platform.python_version()} at {root} (e.g. {examples}); this run's data are not the documented "
            "main job's, so its numbers will differ from docs/training.md"
        )
        if corpus_check == "strict":
            raise CorpusError(message + "; set data.corpus_check=warn to train on them anyway")
        logging.getLogger(__name__).warning(message)
    if not present:
        raise CorpusError(f"none of the {len(entries)} corpus files in {manifest} exist under {root}")
    return present


def identical_files(roots: list[Path]) -> list[tuple[str, str]]:
    """[(relative path, sha256)] of the non-empty .py files (outside site-packages) that
    are byte-identical under every root, sorted by path."""
    digests = []
    for root in roots:
        files = (p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size > 0)
        digests.append({str(p.relative_to(root)): sha256(p) for p in files})
    first, *rest = digests
    return sorted((rel, d) for rel, d in first.items() if all(other.get(rel) == d for other in rest))


def write_manifest(roots: list[Path], out: Path, described_as: str) -> int:
    entries = identical_files(roots)
    if not entries:
        raise CorpusError(f"no file is identical under all of {[str(r) for r in roots]}")
    header = f"# the .py files byte-identical in the standard libraries of {described_as}\n"
    out.write_text(header + "".join(f"{digest}\t{rel}\n" for rel, digest in entries))
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the embedded corpus manifest")
    parser.add_argument("roots", nargs="+", type=Path, help="standard library folders (sysconfig's 'stdlib')")
    parser.add_argument("--describe", required=True, help="what the roots are, e.g. 'Python 3.11.7, 3.12.1'")
    parser.add_argument("--out", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    for root in args.roots:
        if not (root / "os.py").is_file():
            parser.error(f"{root} is not a standard library folder (it has no os.py)")
    n = write_manifest(args.roots, args.out, args.describe)
    print(f"wrote {args.out}: {n} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
