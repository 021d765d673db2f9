"""A Study written as YAML::

    name: my-study                 # optional
    base: models/base              # optional
    experts:                       # name: HF directory, cached hub id or PEFT adapter directory
      math: models/my-math-ft
      chat: adapters/chat-lora
    tasks:                         # name: file / zoo task name, or a mapping with source and options
      math: data/math.jsonl
      general: {source: data/mixed.csv, prompt_field: question, limit: 200}
    probes: data/probes.txt        # optional: one probe per line (default: the tasks' prompts)
    layers_path: transformer.h     # optional
    device: cuda                   # optional: where the explorer and the sweep run (default cpu)
    lm_eval_include: [lm_eval_tasks]   # optional: local lm-eval task folders (tasks: {x: lm_eval:TASK})

Relative paths resolve against the YAML's folder. Unknown keys, and a key given twice in one mapping (a
task or expert named twice), are refused with the line they are on.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from karcher_lab.errors import DataError, ParameterError
from karcher_lab.study.spec import Study

STUDY_KEYS = ("name", "base", "experts", "tasks", "probes", "layers_path", "lm_eval_include", "device")
"""The top-level keys of a study YAML."""
STUDY_SUFFIXES = (".yml", ".yaml")
"""A path with one of these suffixes is a study YAML wherever a study or a pool may be given."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping key given twice."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DataError(f"{self.name}: {key!r} is given twice (lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_study(path: str | Path) -> Study:
    """The :class:`Study` a YAML file describes (module docstring); checked before anything is loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"study file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"study file {path} is not UTF-8 (byte {err.start})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise DataError(f"study file {path} is not valid YAML: {err}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise DataError(f"study file {path} must hold a mapping with keys {list(STUDY_KEYS)}")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise ParameterError(f"study file {path}: unknown key(s) {unknown}; known: {list(STUDY_KEYS)}")
    return Study(experts=data.get("experts") or {}, base=data.get("base"), tasks=data.get("tasks") or {},
                 probes=data.get("probes"), layers_path=data.get("layers_path"),
                 name=data.get("name") or path.stem, relative_to=path.parent.resolve(),
                 lm_eval_include=data.get("lm_eval_include") or (), device=data.get("device"))


def as_study(source: object) -> Study | None:
    """``source`` as a Study: itself, or the study a :data:`STUDY_SUFFIXES` file describes; None for
    anything else (a zoo pool, a pool name or directory)."""
    if isinstance(source, Study):
        return source
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix in STUDY_SUFFIXES:
        return load_study(source)
    return None
