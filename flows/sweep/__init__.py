"""Sweeps: several settings run together and compared."""
