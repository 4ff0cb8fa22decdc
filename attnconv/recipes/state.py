"""What a recipe's earlier runs did, kept beside the recipe (`.NAME.attnconv-run.json`, replaced atomically).

For each output (a folder, or `hub:REPO@REVISION` for a push) the state holds
- `done`: the fingerprint of the inputs that produced it and a marker of the output itself (the sha256 of its
  attnconv.json or results.json), so a folder is known to be the recipe's own only while it is unchanged;
- `attempt`: the fingerprint of a run that started and has not been recorded as done (killed, failed, or
  finished just before a kill): an uptrain attempt with the same fingerprint resumes from its checkpoint.
`files` caches the sha256 of local input files by (size, mtime, inode), so unchanged inputs are not read again.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnconv.errors import AttnconvError
from attnconv.fingerprint import sha256_file
from attnconv.outputs import fsync_dir

FORMAT = 1
MARKERS = {"convert": "attnconv.json", "uptrain": "attnconv.json", "eval": "results.json"}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class State:
    path: Path
    recipe: Path
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, list] = field(default_factory=dict)  # path -> [size, mtime_ns, inode, sha256]
    dirty: bool = False  # files changed since loading

    @classmethod
    def load(cls, path: Path, recipe: Path) -> State:
        if not path.exists():
            return cls(path, recipe)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            outputs, files = dict(data["outputs"]), dict(data.get("files", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise AttnconvError(f"{path} is damaged ({e}); delete it to start the recipe afresh (outputs the recipe "
                                "wrote then count as not its own)") from None
        return cls(path, recipe, _valid_outputs(path, outputs), {k: v for k, v in files.items() if _valid_file(v)})

    def save(self) -> None:
        """Write the state in one step: a temporary file, flushed, renamed over the old one."""
        data = {"format": FORMAT, "recipe": str(self.recipe), "outputs": self.outputs, "files": self.files}
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.dirty = False

    def entry(self, target: str | None) -> dict[str, Any]:
        return self.outputs.get(target or "", {})

    def begin(self, target: str, stage: str, record: dict[str, Any]) -> None:
        entry = self.outputs.setdefault(target, {})
        entry.update(stage=stage, attempt={**record, "started": now()})
        self.save()

    def finish(self, target: str, record: dict[str, Any], marker: str | None, out: Path | None = None) -> None:
        entry = self.outputs.setdefault(target, {})
        done = {**record, "marker": marker, "finished": now()}
        if out is not None:
            done["contents"] = contents(out)
        entry.update(done=done, attempt=None)
        self.save()

    def file_sha(self, path: Path) -> str:
        """sha256 of a file, from the cache while its size, mtime and inode are unchanged."""
        st = path.stat()
        key, signature = str(path), [st.st_size, st.st_mtime_ns, st.st_ino]
        cached = self.files.get(key)
        if cached and cached[:3] == signature:
            return cached[3]
        digest = sha256_file(path)
        self.files[key] = [*signature, digest]
        self.dirty = True
        return digest

    def content_hash(self, path: Path) -> str:
        """sha256 over a file, or over every file of a folder (names and contents; hidden entries left out)."""
        path = path.resolve()
        if path.is_file():
            return self.file_sha(path)
        lines = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                lines.append(f"{rel.as_posix()}:{self.file_sha(p)}")
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _valid_record(record: Any) -> bool:
    return record is None or isinstance(record, dict) and isinstance(record.get("fingerprint"), str) and all(
        isinstance(record.get(k, {}), dict) for k in ("settings", "inputs", "contents"))


def _valid_file(signature: Any) -> bool:
    return isinstance(signature, list) and len(signature) == 4 and all(isinstance(v, int) for v in signature[:3]) \
        and isinstance(signature[3], str)


def _valid_outputs(path: Path, outputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The entries of a state file that have the shape this module writes; a hand-edited one is dropped with a
    warning (its output then counts as not the recipe's own, which is the safe side)."""
    import sys

    kept = {}
    for target, entry in outputs.items():
        if isinstance(entry, dict) and _valid_record(entry.get("done")) and _valid_record(entry.get("attempt")):
            kept[target] = entry
        else:
            print(f"warning: {path}: the record of {target} is damaged and was ignored", file=sys.stderr)
    return kept


def contents(out: Path) -> dict[str, int]:
    """{relative path: size} of every file in an output folder (hidden entries left out), so a file deleted or
    truncated since the run makes it incomplete."""
    found = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            found[rel.as_posix()] = p.stat().st_size
    return found


def complete(done: dict[str, Any], out: Path) -> bool:
    """Whether every file recorded when the run finished is still there with its size (records from before
    contents were kept count as complete)."""
    for rel, size in (done.get("contents") or {}).items():
        try:
            if (out / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def marker(command: str, out: Path) -> str | None:
    """The sha256 of the file that identifies one run's output (its provenance or report), None without it."""
    name = MARKERS.get(command)
    file = out / name if name else None
    return sha256_file(file) if file is not None and file.is_file() else None


def owner(entry: dict[str, Any], command: str, out: Path) -> dict[str, Any] | None:
    """The record of the run that wrote the existing folder OUT when it was this recipe, else None.

    `done` while the folder is unchanged; an `attempt` when a recorded run finished its output and was killed
    before saying so (outputs appear only when complete, so a folder that is not `done`'s is the attempt's)."""
    if not out.exists():
        return None
    done, attempt = entry.get("done"), entry.get("attempt")
    current = marker(command, out)
    if done and current is not None and current == done.get("marker"):
        return done
    if attempt:
        return attempt
    return None


@contextmanager
def recipe_lock(state_path: Path):
    """One run of a recipe at a time: a lock file beside the state, held for the run."""
    lock = state_path.with_name(state_path.name.removesuffix(".json") + ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AttnconvError(f"cannot write beside the recipe ({lock}: {e.strerror}); copy the recipe into a "
                                "writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AttnconvError(f"this recipe is being run by {holder}; wait for it to finish") from None
        if os.path.exists(lock) and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            break  # still the lock file, not one a finishing run just removed
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"attnconv run (pid {os.getpid()})".encode(), 0)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)
