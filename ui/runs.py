"""The UI's view of batch runs: the contract's run reader over the UI's storage client.

Reading, checking (every object against the sha256 recorded at write time) and decoding live in
:mod:`medxplain_contract.runs`, shared with the batch merge; this module only binds it to an SDK
client and a short retry budget (a page should fail in seconds, not ride out a long outage).
Everything under a finished run is immutable, which is why the pages may cache what it returns.
"""

from __future__ import annotations

from medxplain_contract.checksums import IntegrityError
from medxplain_contract.runs import RunInfo, RunReader, find_runs
from medxplain_contract.storage import Bucket, RetryPolicy, StorageError

__all__ = ["IntegrityError", "Run", "RunInfo", "RunStore", "StorageError"]

UI_RETRY = RetryPolicy(attempts=2, first_delay=0.2, max_delay=0.2)


class Run(RunReader):
    """One finished run read through the UI's client (KeyError when an object is absent)."""

    def __init__(self, client, bucket: str, prefix: str) -> None:
        super().__init__(Bucket.of(client, bucket, UI_RETRY), prefix)


class RunStore:
    """Finds finished runs below one prefix (the prefix itself, or up to two levels deeper)."""

    def __init__(self, client, bucket: str, root: str, depth: int = 2) -> None:
        self.bucket, self.root, self.depth = Bucket.of(client, bucket, UI_RETRY), root, depth

    def list_runs(self) -> list[RunInfo]:
        return find_runs(self.bucket, self.root, self.depth)

    def open(self, prefix: str) -> Run:
        return Run(self.bucket.client, self.bucket.name, prefix)
