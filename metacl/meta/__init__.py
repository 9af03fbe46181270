"""Continual meta-learning: ANML, OML and friends."""
