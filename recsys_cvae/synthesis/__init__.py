"""Synthetic users measured against the real ones: fidelity and privacy reports."""
