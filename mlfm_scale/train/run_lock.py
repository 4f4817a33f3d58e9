"""One writer per run directory: the run's rank 0 holds ``OUT_DIR/run.lock`` from before it writes anything
until it exits.

The lock is a JSON file naming its holder — host, pid, SLURM job id and restart count, start time — with a
heartbeat that a daemon thread refreshes every ``heartbeat_s``. A second writer is refused at once with a
:class:`UserError` naming the holder. A lock is stale, and is taken over with a warning, when its heartbeat is
older than ``stale_s``, when its holder ran on this host and is gone, or when it belongs to an earlier run of the
same SLURM job (a requeue: same job id, a lower restart count).

Race-free without advisory locks (shared filesystems often lack them or keep them per node): the lock appears
complete through link(2), which fails when the name exists, so of writers starting together exactly one
creates it. Takeovers are serialised by a second name created the same way (``run.lock.takeover``); under it
the taker checks that the lock is still the stale one it judged, then replaces it by rename(2).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from mlfm_scale.durable import atomic_write_text
from mlfm_scale.errors import UserError

LOCK, TAKEOVER = "run.lock", "run.lock.takeover"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not; another user's process does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust the signal test


def _read(path: Path) -> tuple[bytes, dict] | None:
    """(raw bytes, holder) of the lock at ``path``, or None when there is none. A lock this module did not write
    completely (unparseable) is described by its modification time alone."""
    try:
        raw = path.read_bytes()
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
        if not isinstance(holder, dict) or not isinstance(holder.get("heartbeat"), (int, float)):
            raise ValueError
    except ValueError:
        holder = {"heartbeat": stat.st_mtime}
    return raw, holder


class RunLock:
    """``with RunLock(out_dir): train()`` — or ``lock = RunLock(out_dir).acquire()`` … ``lock.release()``.

    ``lost`` turns True when the heartbeat finds the lock taken over by another writer (this holder was judged
    stale: a heartbeat stalled longer than ``stale_s``); the run should then stop writing."""

    def __init__(self, out_dir: str | os.PathLike, heartbeat_s: float = 10.0, stale_s: float = 60.0):
        if not 0 < heartbeat_s < stale_s:
            raise ValueError(f"the heartbeat ({heartbeat_s} s) must be positive and shorter than the staleness "
                             f"timeout ({stale_s} s)")
        self.path = Path(out_dir) / LOCK
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.lost = False
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raises UserError while another writer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                        "started": now, "heartbeat": now, "token": uuid.uuid4().hex}
        while not self._create():
            found = _read(self.path)
            if found is None:
                continue  # released since: try again
            raw, holder = found
            reason = self._stale(holder)
            if reason is None:
                raise UserError(self._refusal(holder))
            if self._take_over(raw):
                print(f"WARNING: took over {self.path} from {self._describe(holder)}: {reason}", file=sys.stderr,
                      flush=True)
                break
            time.sleep(0.05)  # another writer is taking over, or the lock changed: look again
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._record is not None and self._ours():
            self.path.unlink(missing_ok=True)
        self._record = None

    # ------------------------------------------------------------------------------------------ internals
    def _create(self) -> bool:
        """Create the lock, complete, unless the name exists."""
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.{self._record['token']}")
        try:
            with open(tmp, "w") as f:
                json.dump(self._record, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: bytes) -> bool:
        """Replace the lock if it still holds ``stale``; False when another writer got there first."""
        guard = self.path.with_name(TAKEOVER)
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > self.stale_s:
                    guard.unlink()  # left by a taker that died within its takeover
            except FileNotFoundError:
                pass
            return False
        try:
            found = _read(self.path)
            if found is None or found[0] != stale:  # released (create it instead), refreshed or taken over
                return False
            atomic_write_text(self.path, json.dumps(self._record))
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder`` no longer holds the lock, or None while it does."""
        me = self._record
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == me["slurm_job_id"] \
                and holder.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
            return f"an earlier run of SLURM job {me['slurm_job_id']} (this one is its requeue)"
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"process {holder['pid']} has ended"
        age = time.time() - holder["heartbeat"]
        if age > self.stale_s:
            return f"its last heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
        return None

    def _describe(self, holder: dict) -> str:
        return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, SLURM job "
                f"{holder.get('slurm_job_id') or 'none'}, last heartbeat {time.time() - holder['heartbeat']:.0f} s ago")

    def _refusal(self, holder: dict) -> str:
        return (f"{self.path.parent} is in use by another run ({self._describe(holder)}): wait for it to end or "
                f"stop it, or choose another out_dir. {self.path} names the holder; it is taken over once its "
                f"heartbeat is {self.stale_s:.0f} s old or its process is gone")

    def _ours(self) -> bool:
        found = _read(self.path)
        return found is not None and found[1].get("token") == self._record["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._ours():
                    self.lost = True
                    found = _read(self.path)
                    print(f"WARNING: {self.path} was taken over by another writer"
                          f"{f' ({self._describe(found[1])})' if found else ''}: this run no longer holds it",
                          file=sys.stderr, flush=True)
                    return
                self._record["heartbeat"] = time.time()
                atomic_write_text(self.path, json.dumps(self._record))
            except OSError:
                continue  # a transient filesystem error: the next beat tries again
