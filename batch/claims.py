"""Who works on what, between pods and without a coordinator: heartbeats, attempt markers, the merge lock.

S3 conditional writes do the locking: a marker is created with ``If-None-Match: *`` (exactly one
writer wins) and changed with ``If-Match: <etag>`` (no lost update). A marker's owner counts as
alive while its heartbeat object keeps changing; the check compares two ETags a few heartbeats
apart instead of timestamps, so clock skew between machines does not matter.

An item's attempt marker is written before it is read and decoded and removed once it is complete
or its failure is recorded. A process killed mid-item (out of memory, a crash in a native decoder)
leaves the marker behind: that is how the next run counts the attempt, and after ``max_attempts``
the item goes to ``failures/`` unprocessed, so the shard still completes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from medxplain_contract.layout import MERGE_LOCK, RunLayout
from medxplain_contract.storage import Bucket, PreconditionFailed

log = logging.getLogger(__name__)

__all__ = ["MERGE_LOCK", "Claim", "Writer", "heartbeat_seconds"]
HEARTBEAT_ENV = "MEDXAI_BATCH_HEARTBEAT_SECONDS"
STALE_BEATS = 4  # an owner whose heartbeat did not change for this many intervals is dead


def heartbeat_seconds() -> float:
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, "10"))
    except ValueError:
        value = 10.0
    return min(max(value, 0.2), 300.0)


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Claim:
    status: str  # "claimed" (ours now), "held" (a live writer has it), "poison" (too many attempts)
    attempts: int


class Writer:
    """One process writing into a run: its heartbeat, its item claims and the merge lock."""

    def __init__(self, out: Bucket, prefix: str, interval: float | None = None) -> None:
        self.out, self.prefix, self.layout = out, prefix, RunLayout(prefix)
        self.interval = interval or heartbeat_seconds()
        self.owner = uuid.uuid4().hex[:16]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self._verdicts: dict[str, bool] = {}
        self._verdict_lock = threading.Lock()

    # -- heartbeat --------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beats += 1
        self.out.put(self.layout.writer(self.owner),
                     _json({"owner": self.owner, "beat": self._beats, "host": socket.gethostname()[:64],
                            "pid": os.getpid(), "interval": self.interval}), "application/json")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception as err:  # noqa: BLE001 - a missed beat only makes others wait longer
                log.warning("heartbeat failed: %s", err)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Writer:
        if self._thread is None:
            self._beat()
            self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.out.remove(self.layout.writer(self.owner))
        except Exception as err:  # noqa: BLE001 - a leftover heartbeat only reads as a dead writer
            log.warning("could not remove the heartbeat: %s", err)

    def alive(self, owner: str, fresh: bool = False) -> bool:
        """Whether ``owner``'s heartbeat changes within STALE_BEATS of its interval (waits that long)."""
        if owner == self.owner:
            return True
        with self._verdict_lock:  # one wait per owner, however many threads ask
            if not fresh and owner in self._verdicts:
                return self._verdicts[owner]
            key = self.layout.writer(owner)
            first = self.out.get_or_none(key)
            verdict = False
            if first is not None:
                interval = float(json.loads(first).get("interval", self.interval))
                deadline = time.monotonic() + STALE_BEATS * interval
                while time.monotonic() < deadline:
                    time.sleep(min(interval / 2, max(0.0, deadline - time.monotonic())))
                    now = self.out.get_or_none(key)
                    if now is None:
                        break  # stopped cleanly
                    if now != first:
                        verdict = True
                        break
            if not verdict and first is not None:
                self._remove_quietly(key)  # a dead writer's heartbeat (a live one would just write it again)
            self._verdicts[owner] = verdict
            return verdict

    def _remove_quietly(self, key: str) -> None:
        try:
            self.out.remove(key)
        except Exception as err:  # noqa: BLE001 - only tidiness
            log.debug("could not remove %s: %s", key, type(err).__name__)

    # -- item attempts ----------------------------------------------------------------------------

    def attempt_key(self, item_id: str) -> str:
        return self.layout.attempt(item_id)

    def claim(self, item_id: str, max_attempts: int, tries: int = 8) -> Claim:
        """Record one more attempt at ``item_id`` before touching it, unless a live writer has it or
        it already used up ``max_attempts`` attempts that never finished (the process died)."""
        key = self.attempt_key(item_id)
        for _ in range(tries):
            current = self.out.get_versioned(key)
            if current is None:
                try:
                    self.out.put_if(key, _json({"id": item_id, "owner": self.owner, "attempts": 1}))
                    return Claim("claimed", 1)
                except PreconditionFailed:
                    continue  # another writer claimed it this instant: look at its claim
            old = json.loads(current.data)
            attempts = int(old.get("attempts", 0))
            if old.get("owner") != self.owner and self.alive(str(old.get("owner"))):
                return Claim("held", attempts)
            if attempts >= max_attempts:
                return Claim("poison", attempts)
            try:
                self.out.put_if(key, _json({"id": item_id, "owner": self.owner, "attempts": attempts + 1}),
                                if_match=current.etag)
                return Claim("claimed", attempts + 1)
            except PreconditionFailed:
                continue
        return Claim("held", 0)

    def release(self, item_id: str) -> None:
        """The item finished (complete or failure recorded): its attempts no longer count.

        Best effort: a marker left behind (storage down) belongs to a finished item, which is never
        claimed again; the merge removes such leftovers.
        """
        try:
            self.out.remove(self.attempt_key(item_id))
        except Exception as err:  # noqa: BLE001
            log.warning("could not remove the attempt marker of %s: %s", item_id, type(err).__name__)

    # -- merge lock -------------------------------------------------------------------------------

    @contextmanager
    def merge_lock(self) -> Iterator[None]:
        """Exactly one merger at a time; others wait for it (their merge is then a no-op if nothing changed).

        A lock whose owner's heartbeat stopped is taken over with ``If-Match`` on its ETag.
        """
        key = self.layout.merge_lock
        body = _json({"owner": self.owner})
        while True:
            try:
                self.out.put_if(key, body)
                break
            except PreconditionFailed:
                pass
            current = self.out.get_versioned(key)
            if current is None:
                continue  # released meanwhile
            owner = str(json.loads(current.data).get("owner"))
            if self.alive(owner, fresh=True):
                time.sleep(self.interval / 2)
                continue
            try:
                self.out.put_if(key, body, if_match=current.etag)
                log.warning("took over the merge lock of a writer whose heartbeat stopped")
                break
            except PreconditionFailed:
                continue
        try:
            yield
        finally:
            self.out.remove(key)
