"""TorchServe entry module of adni.mar. TorchServe instantiates its one class; all logic is in the engine."""

from handlers.torchserve_adapter import EngineHandler


class ADNIHandler(EngineHandler):
    """Serves the adni model bundle unpacked from the archive."""
