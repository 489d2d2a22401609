"""Predicting ages of new photos with a champion: the CLI command and the `predict` flow."""
