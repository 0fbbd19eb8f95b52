"""Batch inference to object storage: the same engine as TorchServe, run in-process over many inputs."""
