"""Studies: users' own experts, evaluation tasks and probe texts (:class:`Study`, :func:`load_study`),
and how they resolve into examples, probes and models (:mod:`karcher_lab.study.resolve`)."""
from karcher_lab.study.spec import TASK_OPTIONS, Study, TaskSpec
from karcher_lab.study.yaml_file import STUDY_KEYS, load_study

__all__ = ["STUDY_KEYS", "Study", "TASK_OPTIONS", "TaskSpec", "load_study"]
