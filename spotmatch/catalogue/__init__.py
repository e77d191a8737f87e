"""Catalogue of known individuals: SQLite store (store.py), migrations, model-backed operations (service.py)."""
