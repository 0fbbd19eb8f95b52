"""The inference engine: staged, runtime-independent (TorchServe and batch adapters call it)."""
