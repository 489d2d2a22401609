"""The `agelens` command line."""
