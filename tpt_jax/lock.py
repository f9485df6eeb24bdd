"""One process owns a folder at a time (a thinking shard): a second one stops with a message that
names the holder, instead of overwriting its chunks.

Locally, an exclusive `flock` on `<folder>/.owner`: the kernel drops it when the holder dies, even
by SIGKILL, so a crash never leaves a stale lock. On an object store there is no such thing, so
the lock is a lease object created with a generation-match precondition (create only if absent).
The holder renews it from a background thread; a lease that was not renewed within `lease_s`
(its holder was killed) may be taken over, by deleting exactly the generation that was read,
so of two processes racing for a stale lease only one wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from tpt_jax import storage
from tpt_jax.errors import TptError

LOCK_NAME = ".owner"


class FolderBusyError(TptError):
    """Another process holds the folder."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"


class FolderLock:
    """Context manager: `with FolderLock(folder): ...` (local path or gs://)."""

    def __init__(self, folder: str, lease_s: float = 120.0):
        self.path = os.path.join(folder, LOCK_NAME)
        self.lease_s = lease_s
        self._file = None
        self._generation = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._taken_over = False
        self._renewed_at = time.monotonic()
        self._clock = time.time  # this host's wall clock, which the lease records (tests skew it)

    @property
    def lost(self) -> bool:
        """A remote lease taken over by another process, or not renewed for `lease_s` (another
        process may take it over any time now): the holder must not write on."""
        if self._renewer is None and not self._taken_over:
            return False
        return self._taken_over or time.monotonic() - self._renewed_at > self.lease_s

    def __enter__(self) -> FolderLock:
        if storage.is_remote(self.path):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local -------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = _describe(json.loads(f.read()))
            except ValueError:
                holder = "another process"
            f.close()
            raise FolderBusyError(
                f"{os.path.dirname(self.path)} is in use by {holder}: "
                "one process per shard (wait for it, or stop it first)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()))
        f.flush()
        self._file = f

    # -- object store ------------------------------------------------------------------------
    def _acquire_remote(self) -> None:
        import fsspec

        self._fs, self._inner = fsspec.core.url_to_fs(self.path)
        self._me = _holder()
        if not self._put(0):
            info, holder = self._read()
            age = self._clock() - holder.get("renewed", 0)
            if age < self.lease_s or self._renewed_meanwhile(info):
                raise FolderBusyError(
                    f"{os.path.dirname(self.path)} is in use by {_describe(holder)} "
                    f"(its lease is being renewed): one process per shard"
                )
            # A stale lease: replace exactly the generation we read; if that fails, another
            # process took it over first.
            if not self._put(int(info["generation"])):
                raise FolderBusyError(
                    f"{os.path.dirname(self.path)} was just taken over by another process"
                )
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()

    def _put(self, generation: int) -> bool:
        """Writes the lease if the object's generation is `generation` (0: absent)."""
        bucket, key, _ = self._fs.split_path(self._inner)
        lease = json.dumps({**self._me, "renewed": self._clock()})
        # A multipart upload (metadata + body), as gcsfs itself writes small objects.
        body = (
            f"--lease\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}"
            f"\n--lease\nContent-Type: application/json\n\n{lease}\n--lease--"
        ).encode()
        try:
            reply = self._fs.call(
                "POST",
                f"{self._fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="multipart",
                ifGenerationMatch=str(generation),
                headers={"Content-Type": 'multipart/related; boundary="lease"'},
                data=body,
                json_out=True,
            )
        except FileExistsError:  # HTTP 412: the precondition failed
            return False
        self._generation = int(reply["generation"])
        return True

    def _renewed_meanwhile(self, info: dict) -> bool:
        """Watches the lease for half its length: a live holder renews it (a new generation)
        every quarter. The holder's clock may be off; this judges by what the store shows."""
        deadline = time.monotonic() + self.lease_s / 2
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.lease_s / 8))
            try:
                now, _ = self._read()
            except FileNotFoundError:
                return False  # released meanwhile
            if now.get("generation") != info.get("generation"):
                return True
        return False

    def _read(self) -> tuple[dict, dict]:
        self._fs.invalidate_cache(self._inner)
        info = self._fs.info(self._inner)
        try:
            holder = json.loads(self._fs.cat_file(self._inner))
        except (ValueError, FileNotFoundError):
            holder = {}
        return info, holder

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if self._put(self._generation) or self._still_mine():
                    self._renewed_at = time.monotonic()
                else:
                    self._taken_over = True  # someone presumed us dead and took over
                    return
            except Exception:  # gcsfs raises HttpError, not OSError, once its retries are spent
                continue  # try again at the next renewal; meanwhile `lost` tells the writer

    def _still_mine(self) -> bool:
        """After a refused renewal: was it only a retry of a renewal that had succeeded (its
        reply lost)? Then the object holds our lease at a newer generation."""
        info, holder = self._read()
        if holder.get("pid") == self._me["pid"] and holder.get("since") == self._me["since"]:
            self._generation = int(info["generation"])
            return True
        return False

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            if not self._taken_over:
                bucket, key, _ = self._fs.split_path(self._inner)
                # Taken over or gone: then there is nothing of ours to remove.
                with contextlib.suppress(OSError):  # FileExistsError (412) is an OSError
                    self._fs.call(
                        "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=self._generation
                    )
