"""metacl: continual-learning and meta-learning research on visual tasks."""

__version__ = "0.1.0"
