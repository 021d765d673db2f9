"""Where collapse starts: the first layer whose collapse ratio falls below a threshold.

Input: a tidy table of per-layer ratios r_ℓ = m_merged / Σ_i w_i m_i (from
:func:`karcher_lab.diagnostics.collapse_ratios`, or the sweep's results with scope ``layer``), with
columns ``site``, ``layer``, ``metric``, ``mean`` (and ``std``) plus any columns that identify a merge
(e.g. ``order``, ``method``, ``m``). For each merge and site, on the chosen ratio metric:

- ``onset_layer``: the first layer ℓ with r_ℓ < threshold (NA when none; below 1 = collapse, so the
  default threshold 0.9 flags a loss of more than 10% relative to the experts);
- ``onset_ratio``: r at that layer; ``min_layer`` / ``min_ratio``: where the ratio is lowest;
- ``ratio_layer0``: the ratio at the first layer, to see whether collapse is there from the start.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from karcher_lab.errors import InputError, ParameterError

ONSET_COLUMNS = ["site", "metric", "threshold", "onset_layer", "onset_ratio", "min_layer", "min_ratio", "ratio_layer0"]


def collapse_onset(
    table: pd.DataFrame,
    *,
    metric: str = "variance_ratio",
    threshold: float = 0.9,
    by: Sequence[str] = ("order", "method", "m"),
    sites: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per merge (the ``by`` columns present in ``table``) × site: where ``metric`` first drops
    below ``threshold`` (see the module docstring). Rows with ``layer < 0`` (whole-model values) are ignored."""
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ParameterError(f"threshold must be a positive number, got {threshold!r}")
    needed = ["site", "layer", "metric", "mean"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InputError(f"collapse_onset needs columns {needed}; missing {missing}")
    rows = table[(table["metric"] == metric) & (pd.to_numeric(table["layer"]) >= 0)]
    if sites is not None:
        rows = rows[rows["site"].isin(list(sites))]
    if rows.empty:
        known = sorted(set(table["metric"]))
        raise InputError(f"no per-layer rows with metric {metric!r}" + (f" at sites {list(sites)}" if sites else "")
                         + f"; metrics in the table: {known}")
    keys = [c for c in by if c in rows.columns] + ["site"]
    out = []
    for key, group in rows.groupby(keys, sort=True, dropna=False):
        curve = group.assign(layer=pd.to_numeric(group["layer"]).astype(int)).sort_values("layer")
        if curve["layer"].duplicated().any():
            raise InputError(f"several rows for one layer in the group {dict(zip(keys, key))}: add the columns "
                             f"that tell the merges apart to `by` (now {list(by)})")
        below = curve[curve["mean"] < threshold]
        lowest = curve.loc[curve["mean"].idxmin()]
        out.append({**dict(zip(keys, key)), "metric": metric, "threshold": float(threshold),
                    "onset_layer": int(below["layer"].iloc[0]) if len(below) else pd.NA,
                    "onset_ratio": float(below["mean"].iloc[0]) if len(below) else float("nan"),
                    "min_layer": int(lowest["layer"]), "min_ratio": float(lowest["mean"]),
                    "ratio_layer0": float(curve["mean"].iloc[0])})
    frame = pd.DataFrame(out)
    frame["onset_layer"] = frame["onset_layer"].astype("Int64")
    return frame[[c for c in keys if c != "site"] + ONSET_COLUMNS]
