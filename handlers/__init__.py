"""Inference engine (framework independent) and the thin TorchServe handlers over it."""
