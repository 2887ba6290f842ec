"""Scoring every model's candidates: metrics aggregation, statistics, the report, what-if.

Reads candidate files and exports through the contracts only; nothing below it imports it
(`docs/architecture.md`).
"""
