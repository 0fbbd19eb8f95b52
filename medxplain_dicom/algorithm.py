"""The model that produced a result, as DICOM names it: manufacturer, device, algorithm identification."""

from __future__ import annotations

from dataclasses import dataclass

MANUFACTURER = "MedXplain"


@dataclass(frozen=True)
class Algorithm:
    """Model name and version, the archive's sha256 digest and the engine version (response ``model``)."""

    name: str
    version: str
    archive_digest: str
    engine_version: str

    @property
    def serial_number(self) -> str:
        """DeviceSerialNumber: the archive digest's first 16 hex digits names the exact archive."""
        return self.archive_digest[:16]

    @property
    def software_versions(self) -> list[str]:
        return [f"model {self.version}"[:64], f"engine {self.engine_version}"[:64]]

    def equipment(self) -> dict[str, object]:
        """The General Equipment keywords highdicom's SOP constructors take."""
        return {"manufacturer": MANUFACTURER, "manufacturer_model_name": self.name[:64],
                "software_versions": self.software_versions, "device_serial_number": self.serial_number}
