"""Fusion: global and local evidence calibrated into one probability of "same individual"."""
