"""Published meta-test numbers on Omniglot, to print beside ours (`metacl meta reproduce`).

All are final test-image accuracies after learning N evaluation classes one image at a time
(15 per class; 5 held out per class for the test), with the learning rate chosen per class count
on the test classes themselves, after meta-training on all 964 background classes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedResult:
    source: str
    """Who reported it, and how the model was trained."""
    accuracy: dict[int, float | tuple[float, float]]
    """Class count -> test accuracy, or the (low, high) range over several reports."""


HIGHER_ANML = PublishedResult(
    "higherANML README: ANML, 25,000 second-order episodes, best-on-test LR, 10 runs",
    {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65},
)
ANML_REPLICATIONS = PublishedResult("independent replications of ANML", {600: (0.64, 0.66)})
OML_REPLICATIONS = PublishedResult("independent replications of OML", {600: (0.55, 0.59)})
PUBLISHED = (HIGHER_ANML, ANML_REPLICATIONS, OML_REPLICATIONS)


def published(classes: int, result: PublishedResult) -> str:
    """The published number at `classes` as text ('' when it reports none)."""
    value = result.accuracy.get(classes)
    if value is None:
        return ""
    return f"{value[0]:.2f}-{value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"
