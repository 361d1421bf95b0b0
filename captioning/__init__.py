"""Captioner protocol and backends (blip, llava, retrieval, alt_text): imports nothing else from the project."""
