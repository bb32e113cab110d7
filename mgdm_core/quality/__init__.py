"""Quality of synthetic images: fidelity, diversity, boundary and memorisation measures.

`metrics` holds the distribution distances (Fréchet, KID, k-NN precision/recall) and the
nearest-neighbour distances; `features` trains the reference classifier whose penultimate
activations are the feature space; `report` writes the stage's markdown, CSV and plots.
The stage glue is `mgdm_core.stages.quality`.
"""

from mgdm_core.quality.metrics import (
    frechet_distance, kernel_inception_distance, nearest_neighbours, precision_recall, predictive_scores,
)

__all__ = ["frechet_distance", "kernel_inception_distance", "nearest_neighbours", "precision_recall", "predictive_scores"]
