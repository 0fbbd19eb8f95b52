"""The DICOMweb sink (``--stow URL``): an item's derived DICOM objects STOW-RS'd to the PACS, once.

In addition to the item's objects in MinIO, never instead. Per item, in this order: the item's
objects are written to MinIO, its derived objects (SR, then a Parametric Map and an RGB Secondary
Capture per heatmap: ``Engine.run_prepared(..., with_dicom=True)``, all built before any is sent)
go to the PACS in one STOW-RS request, then ``dicom_stored.json`` (counts and a digest, no UIDs,
no identity) is written, and only then ``_complete.json``, which lists the marker with the other
objects. So a complete item is in the PACS too, and a re-run skips it like any complete item.

A crash between the STOW and the marker makes the next run redo the item and send it again: the
derived UIDs are deterministic (same source, archive and options -> same UIDs), and a PACS keeps
one instance per SOP Instance UID (Orthanc answers a duplicate as stored and keeps its first copy,
``OverwriteInstances: false``), so nothing is stored twice.
"""

from __future__ import annotations

from collections import Counter

from pydicom.dataset import Dataset
from pydicom.uid import UID

from medxplain_contract.dicomweb import Pacs, StoreReceipt
from medxplain_contract.layout import RunLayout
from medxplain_contract.storage import Bucket

MARKER = "dicom_stored.json"
FORMAT = 1


def marker_record(datasets: list[Dataset], receipt: StoreReceipt, url: str) -> dict:
    """What ``dicom_stored.json`` says: object counts per kind and the digest of what was sent."""
    kinds = Counter(UID(str(ds.SOPClassUID)).name for ds in datasets)
    return {"format": FORMAT, "objects": receipt.objects, "kinds": dict(sorted(kinds.items())),
            "warnings": receipt.warnings, "sha256": receipt.sha256, "pacs": url}


class DicomSink:
    """STOW-RS of items' derived objects, with the per-item marker that makes re-runs skip them."""

    def __init__(self, pacs: Pacs, out: Bucket, prefix: str) -> None:
        self.pacs, self.out, self.prefix = pacs, out, prefix

    def marker_key(self, item_id: str) -> str:
        return RunLayout(self.prefix).item(item_id, MARKER)

    def is_stored(self, item_id: str) -> bool:
        return self.out.stat(self.marker_key(item_id)) is not None

    def store(self, datasets: list[Dataset]) -> dict:
        """STOW the item's objects (raises PacsError unless all were stored); returns the marker record."""
        receipt = self.pacs.store(datasets)
        return marker_record(datasets, receipt, self.pacs.url)
