"""One writer per output folder, from a run's start to its end, on a local (or mounted) folder or in object
storage.

A local folder: an exclusive `flock` on `FOLDER/_writer.lock`; the kernel releases it when the process dies,
so no stale lock survives. Object storage has neither locks nor renames, so there the writer holds a lease:
the object `FOLDER/_writer.lease` names its holder and when it expires, and a thread renews it while the run
lasts. A run that finds another's unexpired lease is refused; a lease past its expiry (its holder died or
hung) is taken over. Two runs that start together both write their lease, wait `settle_s` and read it back:
the one whose lease was overwritten leaves. A holder whose lease was taken over (it stalled past the expiry)
learns it at its next `check()` and must stop writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType

import pyarrow.fs as pafs

from magiclens_core.images.sources import filesystem_of

LOCK_FILE = "_writer.lock"
LEASE_FILE = "_writer.lease"


class LeaseLost(RuntimeError):
    """Another run took over the output folder's lease: this run must stop writing."""


def _holder(job: str) -> str:
    return f"{job} pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _refuse(folder: str, holder: str, what: str) -> SystemExit:
    return SystemExit(f"error: {folder} is being written by {holder}, which holds the {what}; wait for that run "
                      "to end or write elsewhere")


def hold_writer_lock(path: str, job: str) -> int:
    """An open descriptor holding an exclusive `flock` on the file at `path` (created if need be), which then
    names this run of `job`; exits with an error naming the lock and its holder when another run holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 512).decode(errors="replace").strip() or "another run"
        os.close(descriptor)
        raise _refuse(os.path.dirname(path), holder, f"lock {path}") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, _holder(job).encode())
    return descriptor


class WriterLease:
    """The lease on an object-storage folder (see the module docstring); `ttl_s` is how long a lease lives
    unrenewed, renewed every third of it."""

    def __init__(self, filesystem: pafs.FileSystem, folder: str, job: str, ttl_s: float = 60.0,
                 settle_s: float = 2.0) -> None:
        self.filesystem, self.path = filesystem, f"{folder.rstrip('/')}/{LEASE_FILE}"
        self.folder, self.ttl_s, self.settle_s = folder, ttl_s, settle_s
        self.token, self.holder = uuid.uuid4().hex, _holder(job)
        self._stop = threading.Event()
        self._lost = False
        self._renewed_at = 0.0
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                return json.loads(stream.read(64 * 1024))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign object: no live lease
            return None

    def _write(self) -> None:
        written = time.time()
        lease = {"holder": self.holder, "token": self.token, "expires": written + self.ttl_s}
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(json.dumps(lease).encode())
        self._renewed_at = written

    def acquire(self) -> None:
        """Take the lease, or exit with an error naming its live holder."""
        current = self._read()
        if current and current.get("token") != self.token and current.get("expires", 0) > time.time():
            raise _refuse(self.folder, current.get("holder", "another run"), f"lease {self.path} until "
                          f"{time.strftime('%H:%M:%S', time.localtime(current['expires']))}")
        self._write()
        time.sleep(self.settle_s)
        current = self._read()
        if not current or current.get("token") != self.token:
            holder = current.get("holder", "another run") if current else "another run"
            raise _refuse(self.folder, holder, f"lease {self.path}, taken as this run started")
        self._renewer = threading.Thread(target=self._renew, name="writer-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = self._read()
                if not current or current.get("token") != self.token:
                    self._lost = True
                    return
                self._write()
            except OSError:  # the store is unreachable for now: try again, until the lease may have expired
                continue

    def check(self) -> None:
        """Raise `LeaseLost` when another run has taken the lease over, or when it went unrenewed so long
        that another could have."""
        if self._lost or time.time() - self._renewed_at > self.ttl_s:
            raise LeaseLost(f"{self.path}: another run took over this folder's lease, or could have (it went "
                            f"unrenewed for over {self.ttl_s:g} s); stopping before writing more")

    def release(self) -> None:
        """Stop renewing, and delete the lease if it is still this run's."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        current = self._read()
        if current and current.get("token") == self.token:
            self.filesystem.delete_file(self.path)


class WriterLock:
    """A context manager holding the output folder at `uri` for one run of `job`: a `flock` on a local
    folder, a `WriterLease` in object storage. `check()` before each commit."""

    def __init__(self, uri: str, job: str, **lease_options: float) -> None:
        self.filesystem, self.folder = filesystem_of(uri)
        self.job, self.lease_options = job, lease_options
        self._descriptor: int | None = None
        self._lease: WriterLease | None = None

    def __enter__(self) -> WriterLock:
        self.filesystem.create_dir(self.folder, recursive=True)
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            self._descriptor = hold_writer_lock(os.path.join(self.folder, LOCK_FILE), self.job)
        else:
            self._lease = WriterLease(self.filesystem, self.folder, self.job, **self.lease_options)
            self._lease.acquire()
        return self

    def check(self) -> None:
        if self._lease is not None:
            self._lease.check()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # releases the lock; the file stays, for the next run to lock
            self._descriptor = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
