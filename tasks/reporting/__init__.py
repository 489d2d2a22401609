"""Reporting helpers: markdown, tables, figures and Prefect artifacts."""
