"""Meta-learning datasets: Omniglot and generic class-per-folder images."""
