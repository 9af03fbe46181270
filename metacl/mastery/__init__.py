"""Sequential-mastery benchmark (Davidson & Mozer, CVPR 2020)."""
