"""Captioner protocol and backends (blip, llava, retrieval, alt_text).

Imports nothing else from the project."""
