"""Studies: users' own experts, evaluation tasks and probe texts (:class:`Study`, :func:`load_study`),
and how they resolve into examples, probes and models (:mod:`karcher_lab.study.resolve`)."""
from karcher_lab.study.from_pool import export_pool_study, pool_study
from karcher_lab.study.spec import TASK_OPTIONS, Study, TaskSpec
from karcher_lab.study.yaml_file import STUDY_KEYS, STUDY_SUFFIXES, as_study, load_study

__all__ = ["STUDY_KEYS", "STUDY_SUFFIXES", "as_study", "Study", "TASK_OPTIONS", "TaskSpec", "export_pool_study", "load_study",
           "pool_study"]
