"""collapse_onset on hand-made ratio curves with known answers."""
import pandas as pd
import pytest

from karcher_lab.diagnostics.collapse_onset import collapse_onset
from karcher_lab.errors import InputError, ParameterError


def _curves():
    rows = []
    curves = {("linear", 3): [0.97, 0.92, 0.71, 0.55, 0.60], ("karcher", 3): [1.01, 0.99, 0.95, 0.93, 0.91]}
    for (method, m), values in curves.items():
        for layer, value in enumerate(values):
            rows.append(dict(order="far", method=method, m=m, scope="layer", site="residual", layer=layer,
                             metric="variance_ratio", mean=value, std=0.01))
        rows.append(dict(order="far", method=method, m=m, scope="layer", site="residual", layer=0,
                         metric="effective_rank_ratio", mean=0.5, std=0.0))
        rows.append(dict(order="far", method=method, m=m, scope="weights", site="", layer=-1,
                         metric="variance_ratio", mean=0.1, std=0.0))  # whole-model rows are ignored
    return pd.DataFrame(rows)


def test_onset_is_the_first_layer_below_threshold():
    onset = collapse_onset(_curves()).set_index("method")
    assert onset.loc["linear", "onset_layer"] == 2 and onset.loc["linear", "onset_ratio"] == 0.71
    assert onset.loc["linear", "min_layer"] == 3 and onset.loc["linear", "min_ratio"] == 0.55
    assert pd.isna(onset.loc["karcher", "onset_layer"])              # never below 0.9
    assert onset.loc["karcher", "ratio_layer0"] == 1.01
    strict = collapse_onset(_curves(), threshold=0.96).set_index("method")
    assert strict.loc["karcher", "onset_layer"] == 2 and strict.loc["linear", "onset_layer"] == 1
    assert list(collapse_onset(_curves(), metric="effective_rank_ratio")["onset_layer"]) == [0, 0]


def test_bad_requests_name_the_problem():
    with pytest.raises(InputError, match="metrics in the table"):
        collapse_onset(_curves(), metric="nope")
    with pytest.raises(InputError, match="several rows"):
        collapse_onset(_curves(), by=("order",))
    with pytest.raises(ParameterError):
        collapse_onset(_curves(), threshold=0)
    with pytest.raises(InputError, match="missing"):
        collapse_onset(pd.DataFrame({"layer": [0]}))
