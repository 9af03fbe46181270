"""Sweeps and launchers (local pool, Slurm)."""
