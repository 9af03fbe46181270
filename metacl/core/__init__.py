"""Run plumbing shared by every experiment: config, run directory, seeding, device, progress."""
