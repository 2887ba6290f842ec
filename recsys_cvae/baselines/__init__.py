"""The models the CVAE has to beat, fitted in memory and written in the candidates format.

Imports the contracts, the numpy leaves and `model.ease`; Mult-VAE, which is the CVAE with
its conditioning switched off, is run by `pipeline.multvae_run` (`docs/architecture.md`).
"""
