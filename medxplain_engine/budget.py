"""Per-request budgets, checked after decoding and before any costly work (docs/api.md, "Budgets").

Three budgets, all configurable under ``handler:`` in the model's ``model-config.yaml``:
- geometry: the size the engine *analyses* (after resizing), not only what the file declares;
  a long, thin image would resize to hundreds of megapixels, so its aspect ratio is capped too;
- explanation cost: every method declares its cost in forward-pass equivalents x analysed size
  (a backward pass counts as two forwards); the online path refuses a request above
  ``online_explain_budget`` with ``too_expensive`` and names settings that fit. Batch jobs
  (``Budget()``, the engine's default) have no cost limit;
- response size: estimated from the number and size of the maps before they are computed, so that
  one row, and therefore a whole dynamic batch of ``batchSize`` rows, stays under the frontend's
  ``max_response_size``. The adapter checks the real encoded size again before returning a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medxplain_contract.errors import InputError, PayloadTooLarge

MIB = 1 << 20
DEFAULT_RESPONSE_LIMIT = 64 * MIB  # docker/serve/config.properties max_response_size
BASE64 = 4 / 3
JSON_OVERHEAD = 64 * 1024  # prediction, units, input meta, timings
PER_MAP_OVERHEAD = 1024
# a deflated float32 Parametric Map + a JPEG-LS lossless RGB overlay (a volume's overlay is one slice), at the
# compression PNG maps are assumed to reach; the encoded body is checked again (check_encoded)
DICOM_BYTES_PER_ELEMENT = (4 + 3) / 2.5
DICOM_OVERHEAD = 64 * 1024  # headers of each object, and the SR
REGION_TABLE_BYTES = 160  # one MRI atlas region row in `regions`
UNIT_MAP_PASSES = 0.25  # upsampling + encoding one unit map, in forward-pass equivalents


class TooExpensive(PayloadTooLarge):
    """Refused before the work: the request's declared cost is above the budget."""


@dataclass
class CostInput:
    """What a method's cost depends on, known before the forward pass."""

    spatial: tuple[int, ...]  # analysed size
    brain_mask: np.ndarray | None = None
    n_regions: int = 0
    voxel_mm: float = 1.0

    @property
    def elements(self) -> int:
        return int(np.prod(self.spatial))


@dataclass(frozen=True)
class Budget:
    online: bool = False
    max_aspect_ratio: float = 3.0  # film and FFDM mammograms are 1.2-2.2:1
    max_analysed_pixels: int = 2_500_000  # a 4k x 6k FFDM analysed at 908 px short side is 1.4 MP
    explain_budget: float | None = None  # M elements x forward-pass equivalents; None: unlimited
    max_row_response_bytes: int | None = None  # None: no frontend (batch job)
    assumed_compression: float = 4.0  # PNG / nifti.gz maps are smooth: at least 4:1 in practice
    unit: str = field(default="Mpx-passes")

    @classmethod
    def from_settings(cls, settings: dict, batch_size: int, online: bool, unit: str) -> Budget:
        """Online: ``handler:`` keys of model-config.yaml; the row limit is the response limit / batch size."""
        limit = int(settings.get("max_response_size", DEFAULT_RESPONSE_LIMIT))
        key = "online_explain_budget" if online else "batch_explain_budget"
        explain = settings.get(key, 100.0 if online else None)
        row = int(settings.get("max_row_response_bytes", limit // max(1, batch_size))) if online else None
        return cls(online=online, max_aspect_ratio=float(settings.get("max_aspect_ratio", cls.max_aspect_ratio)),
                   max_analysed_pixels=int(settings.get("max_analysed_pixels", cls.max_analysed_pixels)),
                   explain_budget=None if explain is None else float(explain), max_row_response_bytes=row,
                   assumed_compression=float(settings.get("assumed_compression", 4.0)), unit=unit)

    # -- geometry --------------------------------------------------------------------------------

    def check_image(self, height: int, width: int, analysed: tuple[int, int]) -> None:
        """Before the resize: the aspect ratio, then the analysed (resized) pixel count."""
        ratio = max(height, width) / max(1, min(height, width))
        if ratio > self.max_aspect_ratio:
            raise InputError("bad_geometry", f"an aspect ratio of {ratio:.1f}:1 is not a mammogram (limit "
                             f"{self.max_aspect_ratio:g}:1); crop the image or send a 227x227 patch")
        pixels = analysed[0] * analysed[1]
        if pixels > self.max_analysed_pixels:
            raise PayloadTooLarge("image_too_large", f"the image would be analysed at {analysed[1]}x{analysed[0]} "
                                  f"= {pixels / 1e6:.1f} MP, above the {self.max_analysed_pixels / 1e6:.1f} MP budget")

    # -- explanation cost ------------------------------------------------------------------------

    def check_cost(self, methods: dict, options, cost: CostInput) -> float:
        """Total cost in M elements x passes; refuses above the budget, naming settings that fit."""
        if self.online:
            batch_only = [name for name in options.explain if not getattr(methods[name], "online", True)]
            if batch_only:
                raise InputError("batch_only_method", f"method {batch_only[0]} is only available in batch jobs")
        per_method = {name: float(methods[name].passes(cost, options)) for name in options.explain}
        unit_maps = UNIT_MAP_PASSES * options.top_k if options.unit_maps else 0.0
        passes = 1.0 + sum(per_method.values()) + unit_maps
        total = passes * cost.elements / 1e6
        if self.explain_budget is None or total <= self.explain_budget:
            return total
        allowed = self.explain_budget * 1e6 / cost.elements  # passes that fit
        hints = []
        for name, p in sorted(per_method.items(), key=lambda kv: -kv[1]):
            hint = methods[name].fitting(cost, options, allowed - (passes - p))
            if hint:
                hints.append(hint)
        if unit_maps and allowed - (passes - unit_maps) >= UNIT_MAP_PASSES:
            hints.append(f"top_k<={int((allowed - (passes - unit_maps)) / UNIT_MAP_PASSES)} with unit_maps")
        fits = "; fits: " + ", ".join(hints[:3]) if hints else ""
        raise TooExpensive("too_expensive", f"cost {total:.0f} {self.unit} exceeds the online budget of "
                           f"{self.explain_budget:g}{fits}; or use the batch job")

    # -- response size ---------------------------------------------------------------------------

    def estimate_response(self, n_maps: int, map_elements: int, encoding: str, region_rows: int = 0) -> int:
        if encoding == "dicom":  # output=dicom: a float32 Parametric Map + an RGB overlay per map, binary parts
            return int(DICOM_OVERHEAD + n_maps * (map_elements * DICOM_BYTES_PER_ELEMENT + DICOM_OVERHEAD))
        bytes_per = 2.0 if encoding == "float16" else 1.0 / self.assumed_compression
        return int(JSON_OVERHEAD + region_rows * REGION_TABLE_BYTES
                   + n_maps * (map_elements * bytes_per * BASE64 + PER_MAP_OVERHEAD))

    def check_response(self, n_maps: int, map_elements: int, encoding: str, region_rows: int = 0) -> None:
        limit = self.max_row_response_bytes
        if limit is None or n_maps == 0:
            return
        size = self.estimate_response(n_maps, map_elements, encoding, region_rows)
        if size <= limit:
            return
        fit = 0
        while fit < n_maps and self.estimate_response(fit + 1, map_elements, encoding, region_rows) <= limit:
            fit += 1
        hints = [f"at most {fit} map(s) (explain methods + unit maps)"]
        if encoding == "float16" and self.estimate_response(n_maps, map_elements, "png", region_rows) <= limit:
            hints.insert(0, "encoding=png")
        raise PayloadTooLarge("response_too_large", f"the response would be about {size / MIB:.0f} MiB, above the "
                              f"{limit / MIB:.0f} MiB limit per request; fits: {', '.join(hints)}; or a smaller input")

    def check_encoded(self, size: int) -> None:
        """The real encoded row (the estimate's backstop: PNG/gzip of noisy maps compress less)."""
        if self.max_row_response_bytes is not None and size > self.max_row_response_bytes:
            raise PayloadTooLarge("response_too_large", f"the encoded response is {size / MIB:.1f} MiB, above the "
                                  f"{self.max_row_response_bytes / MIB:.1f} MiB limit per request; ask for fewer "
                                  "maps, encoding=png, or send a smaller input")
