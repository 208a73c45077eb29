"""The runtime on torch.distributed. This package file imports nothing, so the pure schedules stay importable without torch."""
