"""The experiment of the Karcher-merging paper: merge m = 2…11 experts with every method and watch
where function and activations collapse.

- :mod:`~karcher_lab.experiment.results`: the results table (:data:`RESULT_COLUMNS`, :func:`load_results`)
  and its resumable storage;
- :mod:`~karcher_lab.experiment.subject`: what a sweep runs on, a zoo pool or a :class:`karcher_lab.Study`;
- :mod:`~karcher_lab.experiment.grid`: orders, methods, m values and parameters, checked up front;
  :mod:`~karcher_lab.experiment.distances`: the task-vector distances that order experts without levels;
- :mod:`~karcher_lab.experiment.measure`: what is measured for each merge and each expert;
- :mod:`~karcher_lab.experiment.sweep`: :func:`run_sweep`; :mod:`~karcher_lab.experiment.pairwise`:
  the pairwise table across model scales; :mod:`~karcher_lab.experiment.report`: the HTML report.
"""
from karcher_lab.experiment.grid import DEFAULT_METHODS, DEFAULT_PARAMS, make_grid
from karcher_lab.experiment.results import RESULT_COLUMNS, ResultStore, load_results
from karcher_lab.experiment.sweep import run_sweep

__all__ = ["DEFAULT_METHODS", "DEFAULT_PARAMS", "RESULT_COLUMNS", "ResultStore", "load_results", "make_grid", "run_sweep"]
