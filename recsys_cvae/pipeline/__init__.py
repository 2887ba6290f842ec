"""What drives several stages: the stages in order, per-protocol CVAE runs, Mult-VAE as a
baseline run, the stage timer.

The top of the library: it may import every role folder; none imports it. The Beam jobs it
starts are handed in by the CLI (`stages.BeamJobs`), so the library never imports `beam_jobs`
(`docs/architecture.md`).
"""
