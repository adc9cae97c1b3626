"""Operation families: each module holds parameter models and pure functions on pyvips images."""
