"""Calls to TorchServe for the UI (Analyse, and Similar's uploads), with people-readable failures.

An uploaded image's embedding comes from TorchServe, not from a model loaded in the UI: the
embedding is the L2-normalised vector of every unit's spatial maximum, and the API already
returns each ranked unit's ``activation`` = that maximum; asking for ``top_k`` = all units
gives the full vector. The server must serve the same weights as the run (checked through
``weights_sha256``), otherwise the scores would compare two different feature spaces.
"""

from __future__ import annotations

import numpy as np

from medxplain_client.client import Client
from medxplain_client.errors import ClientError, ConnectionFailed
from ui.settings import UISettings

FILE_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "dcm", "dicom", "nii", "gz"]


class ServingError(RuntimeError):
    """TorchServe refused or could not be reached; the message is meant for people."""


def client(settings: UISettings) -> Client:
    try:
        return Client(settings.torchserve_url, key_file=settings.torchserve_key_file, timeout=300.0, retries=2)
    except ValueError as err:
        raise ServingError(f"TorchServe settings: {err}") from None


def call(settings: UISettings, model: str, payload: bytes, **params) -> dict:
    """One prediction/explanation; every failure becomes a ServingError with a readable message."""
    with client(settings) as c:
        try:
            return c.explain(model, payload, **params) if params.get("methods") is not None else \
                c.predict(model, payload, **params)
        except ConnectionFailed:
            raise ServingError(f"TorchServe is not reachable at {settings.torchserve_url} "
                               "(set MEDXAI_TORCHSERVE_URL).") from None
        except ClientError as err:
            if err.status in (401, 403):
                raise ServingError("TorchServe refused the token (set MEDXAI_TORCHSERVE_KEY_FILE to its "
                                   "key_file.json).") from None
            if err.is_client_fault:
                raise ServingError(f"The file was not accepted: {err.message}") from None
            raise ServingError(f"TorchServe failed ({err.status} {err.error}): {err.message}") from None


def embedding_from_response(response: dict, dim: int) -> np.ndarray:
    """The run's embedding of the sent input from a response made with ``top_k=dim``."""
    vector = np.zeros(dim, np.float32)
    units = response.get("units") or []
    if len(units) < dim:
        raise ServingError(f"the server returned {len(units)} unit activations, the run's embedding has {dim}")
    for u in units:
        vector[int(u["unit"])] = float(u["activation"])
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
