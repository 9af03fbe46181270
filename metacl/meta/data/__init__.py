"""Meta-learning datasets: Omniglot and generic class-per-folder images, as dense device tensors.

- `load_dataset(name, split, ...) -> ClassImages`: download, preprocess and cache once, then load fast.
- `split_classes(data, val_classes, seed)`: a seeded held-out validation set of classes.
- `random_resized_crop(images, generator)`: batched augmentation on the device.
"""

from .augment import random_resized_crop
from .class_images import ClassImages, split_classes
from .datasets import DATASETS, load_dataset

__all__ = ["ClassImages", "DATASETS", "load_dataset", "random_resized_crop", "split_classes"]
