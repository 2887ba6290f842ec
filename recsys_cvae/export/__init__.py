"""The SavedModel users serve (`saved_model`) and its check in a fresh process (`verification`).

Imports `model/` and the contracts; the serving package reads what it writes without importing
it (`docs/architecture.md`).
"""
