"""Teaching material for notebook 02 (Fisher–Rao geometry) and its playgrounds; not on the merge path.

- :mod:`~karcher_lab.teaching.fisher_rao`: KL against the Fisher–Rao distance, the mixture against the
  Fisher–Rao Karcher mean, the chord-versus-geodesic gap, every iterate of the Karcher fixed-point
  iteration, and the shrinkage of averaged unit vectors (tables as pandas DataFrames).
- :mod:`~karcher_lab.teaching.scaling_toy`: the GeoMerge paper's §4 toy f_θ(x) = θ₁θ₂x with its scaling
  symmetry, in closed form: metric, horizontal geodesics, quotient distance and the Euclidean, Fisher
  and quotient means.

The math they illustrate lives in :mod:`karcher_lab.geometry`.
"""
from karcher_lab.teaching import fisher_rao, scaling_toy
from karcher_lab.teaching.fisher_rao import (
    fr_versus_kl,
    karcher_path,
    kl_divergence,
    mean_norm_ratio,
    mixture,
    random_mean_norm_ratio,
    two_point_chord_gap,
)
from karcher_lab.teaching.scaling_toy import (
    euclidean_mean,
    fisher_information,
    fisher_mean,
    gauge,
    horizontal_geodesic,
    horizontal_part,
    metric,
    predictor,
    quotient_distance,
    quotient_mean,
    vertical,
)

__all__ = [
    "euclidean_mean",
    "fisher_information",
    "fisher_mean",
    "fisher_rao",
    "fr_versus_kl",
    "gauge",
    "horizontal_geodesic",
    "horizontal_part",
    "karcher_path",
    "kl_divergence",
    "mean_norm_ratio",
    "metric",
    "mixture",
    "predictor",
    "quotient_distance",
    "quotient_mean",
    "random_mean_norm_ratio",
    "scaling_toy",
    "two_point_chord_gap",
    "vertical",
]
