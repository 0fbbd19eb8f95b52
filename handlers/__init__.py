"""TorchServe entry modules and the thin adapter from TorchServe rows to the engine (medxplain_engine)."""
