"""Sweeps and launchers: many runs from one command, on this machine or on Slurm.

sweep.py    grid x seeds -> named, validated runs; skip complete, resume the rest; reports
local.py    a pool of worker processes, each with its own threads and GPU slot
slurm.py    one submitit job array; checkpoint and requeue on time limit or preemption
worker.py   `python -m metacl.launch.worker`: executes one run (both launchers use it)
runs.py     runs on disk as a table: `metacl runs ls|compare`
"""
