"""The experiment of the Karcher-merging paper: merge m = 2…11 experts with every method and watch
where function and activations collapse (:mod:`~karcher_lab.experiment.results`: the results table)."""
from karcher_lab.experiment.results import RESULT_COLUMNS, ResultStore, load_results

__all__ = ["RESULT_COLUMNS", "ResultStore", "load_results"]
