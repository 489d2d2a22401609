"""The model registry: each configuration's champion and the decisions about it."""
