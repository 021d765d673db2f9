"""A session's resident memory does not grow with the number of experts (the small-model version of
benchmarks/explorer_scale.py, measured by peak RSS in fresh processes), and the disk cache of the
experts' measurements is reused, and invalidated when an expert's bytes change."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from karcher_lab import load_study
from karcher_lab.cache_root import CACHE_ENV
from karcher_lab.io.synthetic import tiny_config
from karcher_lab.measurement import MeasurementSettings, engine_for_study
from karcher_lab.measurement.cache import MeasurementCache, clear_measurements
from karcher_lab.study.synthetic import write_synthetic_study

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, vocab_size=8192)
"""About 29 M parameters: 116 MB per expert in float32, well above the noise of a process's RSS."""


def peak_rss(study: Path, cache: Path) -> int:
    env = {**os.environ, CACHE_ENV: str(cache), "KARCHER_LAB_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "explorer_scale.py"), "--child", str(study)],
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def test_peak_memory_does_not_grow_with_the_number_of_experts(tmp_path):
    small = write_synthetic_study(tmp_path / "n2", 2, config=CONFIG)
    large = write_synthetic_study(tmp_path / "n6", 6, config=CONFIG)
    expert = (small.parent / "experts" / "e0" / "model.safetensors").stat().st_size
    two, six = peak_rss(small, tmp_path / "cache2"), peak_rss(large, tmp_path / "cache6")
    # every expert held in memory would add 4 × 116 MB; streaming from disk adds (almost) nothing
    assert six - two < 0.5 * expert, f"peak RSS {two / 2**20:.0f} MiB with 2 experts, {six / 2**20:.0f} MiB with 6"


@pytest.fixture()
def study_folder(tmp_path):
    return write_synthetic_study(tmp_path / "study", 2, config=tiny_config(), examples_per_task=4, probes=4)


def measured(study_file: Path, cache: MeasurementCache):
    engine = engine_for_study(load_study(study_file), settings=MeasurementSettings(draws=2), cache=cache)
    tables = {name: (engine.experts.quality(name), engine.experts.collapse(name)) for name in engine.experts.names}
    return engine.experts.loads, tables


def test_the_disk_cache_is_reused_and_invalidated_when_an_experts_bytes_change(study_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "root"))
    cache = MeasurementCache()
    loads, first = measured(study_folder, cache)
    assert loads == 2
    loads, again = measured(study_folder, cache)
    assert loads == 0  # both experts from the disk cache, no model loaded
    for name in first:
        pd.testing.assert_frame_equal(again[name][0], first[name][0])
        pd.testing.assert_frame_equal(again[name][1], first[name][1])

    weights = study_folder.parent / "experts" / "e1" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.down_proj.weight"] *= 1.5
    save_file(state, weights, metadata={"format": "pt"})
    loads, changed = measured(study_folder, cache)
    assert loads == 1  # e1's bytes changed: measured again; e0 still cached
    fresh = measured(study_folder, None)[1]
    pd.testing.assert_frame_equal(changed["e1"][1], fresh["e1"][1])
    assert not changed["e1"][1]["mean"].equals(first["e1"][1]["mean"])
    assert clear_measurements() > 0 and not (tmp_path / "root" / "measurements").exists()
    assert measured(study_folder, cache)[0] == 2  # cleared: measured again


def test_the_cache_command_shows_and_clears_the_measurements(study_folder, tmp_path, capsys):
    from karcher_lab.cli import main

    root = tmp_path / "root"
    measured(study_folder, MeasurementCache(root / "measurements"))
    assert main(["cache", "--cache-dir", str(root)]) == 0
    assert "2 cached expert measurement(s)" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert "cleared" in capsys.readouterr().out and not (root / "measurements").exists()
    assert main(["cache", "--cache-dir", str(root)]) == 0
    assert "0 cached expert measurement(s)" in capsys.readouterr().out
