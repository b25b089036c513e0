"""Run directories anywhere etils.epath reaches: local paths and object stores (gs://, s3://).

Every command that reads or writes a run directory takes its location through `location`,
which refuses malformed URLs with one line. Checkpoints go straight through Orbax, which
writes to gs:// itself. Files that grow a line at a time (train.log, metrics.jsonl,
TensorBoard events) cannot be appended to in an object store, so for a remote run directory
they live in a local staging folder (`Staging`) and are copied up whole at sync points: every
evaluation, before every checkpoint (so a resume, which drops the records past its step,
never lacks one), every `interval` seconds and at the end. In a multi-host run only process 0
writes these shared files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from etils import epath

from moe.config import ConfigError

REMOTE_SCHEMES = ("gs", "s3")  # what epath reaches through fsspec (gcsfs, installed; s3fs for s3://)


def location(where: str | os.PathLike) -> epath.Path:
    """A run directory, checkpoint or output location as an epath.Path; a malformed URL
    (gs:/bucket, gs://, gs:///path, an unknown scheme) is a one-line ConfigError."""
    text = os.fspath(where)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/(/?)(.*)$", text)
    if match:
        scheme, slashes, rest = match.groups()
        bucket = rest.split("/", 1)[0]
        if scheme not in REMOTE_SCHEMES or not slashes or not bucket:
            raise ConfigError(
                f"malformed location {text!r}: use a local path or gs://BUCKET/PATH "
                f"(e.g. gs://my-bucket/runs/x; s3:// likewise)"
            )
    return epath.Path(text)


def out_dir(text: str) -> str:
    """A folder a command writes, as given on its command line: `out/` and `out` alike (the
    trailing slashes dropped, a gs:// URL's too), so a temporary `OUT.partial` beside it
    and the rename onto OUT work either way. Every command's OUT folder argument is read
    through it (argparse `type=`)."""
    stripped = text.rstrip("/")
    return stripped if stripped and not stripped.endswith(":") else text


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def absolute(where) -> epath.Path:
    """An epath.Path made absolute when local; a gs:// URL as given."""
    path = epath.Path(where)
    return path if is_remote(path) else path.absolute()


STAGING_PREFIX = "moe-staging-"


def remove_stale_staging(temp_dir: str | None = None) -> list[Path]:
    """Remove the staging folders that processes killed without cleaning up (SIGKILL, a lost
    host) left in the temp folder: this user's `moe-staging-<pid>-*` folders whose process
    is gone. Their files were copied up at the last sync; what came after is lost with the
    run's own state, which resumes from its last checkpoint."""
    removed = []
    for folder in Path(temp_dir or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staging:
    """A local folder that stands for `remote`: the folder itself when it is local; else a
    temporary one (named for this process, so a later start removes it if this one is
    killed), first filled with `fetch` (names under remote that exist), whose changed files
    `sync` copies up."""

    def __init__(self, remote: epath.Path, fetch: tuple[str, ...] = (), interval: float = 60.0):
        self.remote, self.interval = remote, interval
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()
        if not is_remote(remote):
            self.local = Path(os.fspath(remote))
            return
        remove_stale_staging()
        self.local = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        for name in fetch:
            if (remote / name).exists():
                target = self.local / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((remote / name).read_bytes())
                self._sent[name] = self._stamp(target)

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns

    def sync(self, force: bool = True) -> None:
        """Copy every new or changed file up (at most every `interval` s unless forced)."""
        if not is_remote(self.remote) or (not force and time.monotonic() - self._last < self.interval):
            return
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name, stamp = path.relative_to(self.local).as_posix(), self._stamp(path)
            if self._sent.get(name) != stamp:
                (self.remote / name).parent.mkdir(parents=True, exist_ok=True)
                (self.remote / name).write_bytes(path.read_bytes())
                self._sent[name] = stamp
        self._last = time.monotonic()

    def close(self) -> None:
        self.sync()
        if is_remote(self.remote):
            shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
