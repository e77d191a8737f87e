"""Retrieval metrics and evaluation protocols: one implementation used by every command."""
