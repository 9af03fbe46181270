"""Meta-training algorithms (meta, sequential_episodic, iid)."""
