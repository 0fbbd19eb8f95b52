"""Torch-free contract shared by engine, batch, UI and client: errors, encodings, input decoding, storage."""
