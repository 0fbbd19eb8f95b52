"""MedXplain client: predictions and explanations from a MedXplain TorchServe over REST or gRPC.

    from medxplain_client import Client
    with Client(key_file="key_file.json") as client:
        result = client.explain("ddsm", "scan.png", methods=["cam"])
"""

from medxplain_client.client import Client
from medxplain_client.errors import ClientError, ConnectionFailed

__all__ = ["Client", "ClientError", "ConnectionFailed"]
