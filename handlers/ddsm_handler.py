"""TorchServe entry module of ddsm.mar. TorchServe instantiates its one class; all logic is in the engine."""

from handlers.torchserve_adapter import EngineHandler


class DDSMHandler(EngineHandler):
    """Serves the ddsm model bundle unpacked from the archive."""
