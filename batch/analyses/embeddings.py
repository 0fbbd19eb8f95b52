"""The run's embedding matrix, kept on disk while the merge streams over the items.

One float32 row per item is appended to a raw file (the matrix of a hospital archive does not fit
in the merge's memory: 10^6 x 2048 is 8 GiB) and the item table (id, case, truth, predicted) to a
JSON-lines file; the merge reads both back in chunks to write ``index/embeddings.npy``,
``index/ids.json`` and ``index/similarity.json`` and to fill the FAISS index.
"""

from __future__ import annotations

import io
import json
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from batch.records import ItemRecord
from medxplain_contract.similarity import load_npy

__all__ = ["EmbeddingStore", "embedding_matrix", "load_npy", "npy_bytes"]

CHUNK_ROWS = 8192


def embedding_matrix(records: list[ItemRecord]) -> tuple[list[str], np.ndarray]:
    """Ids and the (items, units) matrix of features["embedding"] (L2-normalised by the engine)."""
    ids = [r.item_id for r in records]
    if not records:
        return ids, np.zeros((0, 0), np.float32)
    return ids, np.stack([np.asarray(r.features["embedding"], np.float32).ravel() for r in records])


def npy_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(matrix), allow_pickle=False)
    return buf.getvalue()


class EmbeddingStore:
    """Rows and item table appended one item at a time under ``workdir``; read back in chunks."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.rows_path, self.table_path = self.workdir / "embeddings.f32", self.workdir / "items.jsonl"
        self._rows = open(self.rows_path, "wb")  # noqa: SIM115 - open across add() calls, closed by close()
        self._table = open(self.table_path, "w", encoding="utf-8")  # noqa: SIM115 - as above
        self.n = 0
        self.dim: int | None = None
        self.case_codes = array("q")  # per row: a code per distinct case_id (equality is all that matters)
        self._case_code: dict[str, int] = {}

    def add(self, item_id: str, case_id: str, truth: str | None, predicted: str, embedding: np.ndarray) -> None:
        row = np.ascontiguousarray(np.asarray(embedding, np.float32).ravel())
        if self.dim is None:
            self.dim = int(row.size)
        elif row.size != self.dim:
            raise ValueError(f"item {item_id}: embedding of {row.size} values, the run's have {self.dim}")
        self._rows.write(row.tobytes())
        self._table.write(json.dumps({"id": item_id, "case_id": case_id, "truth": truth, "predicted": predicted},
                                     separators=(",", ":")) + "\n")
        self.case_codes.append(self._case_code.setdefault(case_id, len(self._case_code)))
        self.n += 1

    def close(self) -> None:
        self._rows.close()
        self._table.close()

    @property
    def cases(self) -> int:
        return len(self._case_code)

    def codes(self) -> np.ndarray:
        return np.frombuffer(self.case_codes, np.int64) if self.n else np.zeros(0, np.int64)

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """The matrix in order, ``rows`` rows at a time (read from disk: no block outlives its use)."""
        with open(self.rows_path, "rb") as f:
            while block := f.read(rows * (self.dim or 0) * 4):
                yield np.frombuffer(block, np.float32).reshape(-1, self.dim)

    def matrix(self) -> np.ndarray:
        """The whole matrix in memory (the exact path, below the ANN threshold)."""
        return np.fromfile(self.rows_path, np.float32).reshape(self.n, self.dim or 0)

    def table(self) -> Iterator[dict]:
        with open(self.table_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def write_npy(self, path: Path) -> Path:
        """index/embeddings.npy, byte for byte what ``np.save`` writes for the whole matrix."""
        with open(path, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (self.n, self.dim or 0)})
            out.writelines(block.tobytes() for block in self.chunks())
        return path

    def write_ids(self, path: Path) -> Path:
        """index/ids.json: the ids in row order (compact JSON, as ``dumps`` writes a list)."""
        with open(path, "w", encoding="utf-8") as out:
            out.write("[")
            out.writelines(("," if i else "") + json.dumps(item["id"]) for i, item in enumerate(self.table()))
            out.write("]")
        return path
