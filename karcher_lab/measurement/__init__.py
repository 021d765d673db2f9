"""Measuring merged models against their experts: the one engine behind the sweep and the explorer.

- :mod:`~karcher_lab.measurement.settings`: :class:`MeasurementSettings` (sites, draws, seed, exact match,
  batch sizes, device);
- :mod:`~karcher_lab.measurement.data`: :class:`EvaluationData` (tokenizer, examples per task, probe batch);
- :mod:`~karcher_lab.measurement.experts`: :class:`ExpertMeasurements`, every expert-side number
  computed once;
- :mod:`~karcher_lab.measurement.engine`: :class:`MeasurementEngine`, the weight, function and layer
  metrics of a merged model, stage by stage or all at once (:meth:`MeasurementEngine.measure`);
- :mod:`~karcher_lab.measurement.results`: what it returns (:class:`Measurement`, :class:`FunctionMetrics`,
  :class:`LayerMetrics`);
- :mod:`~karcher_lab.measurement.studies`: :func:`engine_for_study`, the engine of a
  :class:`~karcher_lab.study.Study` (a zoo pool is one: :func:`~karcher_lab.study.pool_study`).

The engine takes plain data (models or loaders, a tokenizer, examples, probe texts); only
:mod:`~karcher_lab.measurement.studies` knows studies, and nothing here knows the zoo.
"""
from karcher_lab.measurement.data import EvaluationData, evaluation_data
from karcher_lab.measurement.engine import MeasurementEngine
from karcher_lab.measurement.experts import ExpertMeasurements
from karcher_lab.measurement.results import FunctionMetrics, LayerMetrics, Measurement
from karcher_lab.measurement.settings import MeasurementSettings
from karcher_lab.measurement.studies import engine_for_study

__all__ = [
    "EvaluationData", "ExpertMeasurements", "FunctionMetrics", "LayerMetrics", "Measurement", "MeasurementEngine",
    "MeasurementSettings", "engine_for_study", "evaluation_data",
]
