"""Orchestration: the chain of stages for pair scoring and identification."""
