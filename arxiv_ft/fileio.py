"""Files that are never seen half-written, and a lock that keeps two runs out of one folder.

Every file the project writes for a reader goes through `atomic_write`: a temporary file in the same folder,
fsynced, renamed over the target, and the folder fsynced, so after a crash or a power loss a reader finds the old
file or the new one, never a torn one. No heavy imports: the command-line `--help` path imports this.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a fsynced temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files only their owner can read; a run folder is shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Readable JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path):
    """The JSON in a file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def json_digest(obj) -> str:
    """SHA-256 of `obj` as canonical JSON (sorted keys): the key of a cache entry or a recorded configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cached_json(folder: str | Path, name: str, key, compute, write: bool = True) -> tuple[object, bool]:
    """`compute()`'s JSON result, computed once per `key` and then read from `folder/name-<hash of key>.json`
    (the stored key must equal `key`, so a hash collision or a stale file is recomputed). Returns (result, from the
    cache?). Written atomically: two processes computing the same key at once never read half a file. Pass
    `write=False` on processes other than the one that should write."""
    path = Path(folder) / f"{name}-{json_digest(key)[:20]}.json"
    if path.is_file():
        cached = read_json(path)
        if cached.get("key") == key:
            return cached["result"], True
    result = compute()
    if write:
        atomic_write(path, json.dumps({"key": key, "result": result}))
    return result, False


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under `folder` (for files written by libraries that do not fsync)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(path)
    fsync_dir(folder)


def cache_root() -> Path:
    """Where this project caches what it derives (converted models, probes, datasets): $ARXIV_FT_CACHE, else
    ~/.cache/arxiv_ft. Created private to its user (what it holds is trained on without being re-read)."""
    root = Path(os.environ.get("ARXIV_FT_CACHE", Path.home() / ".cache" / "arxiv_ft"))
    if not root.exists():
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def file_digest(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (streamed: ~0.3 s a 100 MB file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class FolderLock:
    """An exclusive, non-blocking lock on a folder (a `.lock` file held with flock) for the life of a process.

    Two identical runs started at once would both do all the work and overwrite each other's files; the second one
    stops at once instead. The kernel releases the lock when the process dies, however it dies.
    """

    def __init__(self, folder: str | Path, name: str = ".lock"):
        self.path = Path(folder) / name
        self._fh = None

    def acquire(self, what: str) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise SystemExit(f"{self.path} is a folder where {what} keeps its lock file: move it away")
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                message = f"{self.path.parent} is in use by {holder}: {what} refuses to run in it at the same time"
                raise SystemExit(message) from None
            # The holder removes the file when it releases: a lock taken on a file already removed is no lock.
            try:
                if os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so nobody locks a file about to vanish), then unlock."""
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class NoLock:
    """What a process that holds no lock releases (every process but the main one)."""

    def release(self) -> None:
        pass


def claim_on_main(state, take) -> FolderLock | NoLock:
    """The main process runs `take()` (take a lock, check the folder; SystemExit to refuse) and every process stops
    alike when it refuses: the refusal is broadcast, so no process waits for one that has left. `state`: an
    accelerate Accelerator or PartialState."""
    problem, lock = [None], NoLock()
    if state.is_main_process:
        try:
            lock = take()
        except SystemExit as exc:
            problem = [str(exc)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    if problem[0]:
        raise SystemExit(problem[0])
    return lock
