"""KServe runtime: the same ``.mar`` served by KServe's Python ``ModelServer`` (Open Inference Protocol v1/v2)."""
