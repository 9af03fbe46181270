"""The compositional-scenes dataset (CLEVR-like) of the sequential-mastery benchmark."""
