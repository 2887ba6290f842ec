"""The CVAE itself: layers, losses, preprocessing layers, in-graph top-K and EASE's closed form.

Imports only the contracts (`config`, `spec`) and the shared leaves below it; training, export
and serving build on it, never the other way round (`docs/architecture.md`).
"""
