"""Inputs of reconstruction, rendering and synthesis: a split is a name, never a path; a process count is
at least 1. Every bad value is refused before anything is written, as a one-line error naming the option.

    .venv/bin/python -m pytest tests/unit/test_render_synth_inputs.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from moho_bridge import cli as moho_cli
from moho_bridge.pipeline import ReconstructParams, RenderParams
from occ_core import render, synth
from occ_core.cli import main as occ
from occ_core.errors import StageError
from occ_core.render import RenderJob, read_jobs

BAD_SPLITS = ["../r30/test", "test/../../x", "/tmp/test", "", "test ", "a.b"]


def usage_error(result, option: str) -> str:
    """The one error line of a click usage error (exit 2) that names ``option``; no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0], result.output
    return errors[0]


# --- a split is a name ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", BAD_SPLITS)
@pytest.mark.parametrize(
    "build",
    [
        lambda split: ReconstructParams(root=Path("/data"), split=split),
        lambda split: RenderParams(root=Path("/data"), split=split),
        lambda split: synth.SynthConfig(out=Path("/data"), splits=("train", split)),
    ],
    ids=["ReconstructParams", "RenderParams", "SynthConfig"],
)
def test_a_split_that_is_not_a_name_is_refused_by_every_params_model(build, split):
    with pytest.raises(ValidationError, match="split must be a name"):
        build(split)


@pytest.mark.parametrize("split", BAD_SPLITS)
def test_a_render_job_refuses_a_split_that_is_not_a_name(split):
    with pytest.raises(ValueError, match="split must be a name"):
        RenderJob("00000001", split, Path("mesh.ply"), np.eye(4))


def test_any_name_of_letters_digits_dash_and_underscore_is_a_split():
    assert RenderParams(root=Path("/data"), split="r30_test-2").split == "r30_test-2"
    assert synth.SynthConfig(out=Path("/data"), splits=("r30", "test")).splits == ("r30", "test")


def test_a_split_listed_twice_for_synthesis_is_refused():
    with pytest.raises(ValidationError, match="more than once"):
        synth.SynthConfig(out=Path("/data"), splits=("test", "test"))


def test_a_render_job_line_with_a_split_path_names_the_file_and_line(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    row = {
        "sample_id": "00000001",
        "split": "../r30/test",
        "mesh_path": "m.ply",
        "obj_to_cam": np.eye(4).tolist(),
    }
    jobs.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(StageError, match=r"jobs\.jsonl:2: .*split must be a name"):
        read_jobs(jobs)


@pytest.mark.parametrize("command", ["render", "reconstruct"])
def test_occ_render_and_reconstruct_refuse_a_split_path_before_writing(tmp_path, command):
    out = tmp_path / "V"
    args = [command, "--root", str(tmp_path), "--split", "../r30/test", "--out", str(out)]
    line = usage_error(CliRunner().invoke(occ, args), "'--split'")
    assert "../r30/test" in line
    assert not out.exists()


def test_python_m_moho_bridge_cli_refuses_a_split_path(tmp_path):
    result = CliRunner().invoke(moho_cli.cli, ["render", "--root", str(tmp_path), "--split", "a/b"])
    usage_error(result, "'--split'")


def test_occ_synth_refuses_a_split_path_before_writing(tmp_path):
    out = tmp_path / "synth"
    result = CliRunner().invoke(occ, ["synth", "--out", str(out), "--splits", "train,../r30/test"])
    usage_error(result, "'--splits'")
    assert not out.exists()


def test_occ_render_jobs_file_with_a_split_path_is_one_error_line_naming_the_file(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    row = {"sample_id": "00000001", "split": "../x", "mesh_path": "m.ply", "obj_to_cam": np.eye(4).tolist()}
    jobs.write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(render.cli, ["--jobs", str(jobs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{jobs}:1:" in result.output and "split must be a name" in result.output
    assert not (tmp_path / "out").exists()


# --- a process count is at least 1 ------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["0", "-2"])
@pytest.mark.parametrize(
    "args",
    [
        lambda tmp: [occ, "synth", "--out", str(tmp / "synth")],
        lambda tmp: [occ, "render", "--root", str(tmp)],
        lambda tmp: [moho_cli.cli, "render", "--root", str(tmp)],
        lambda tmp: [render.cli, "--jobs", str(tmp / "jobs.jsonl"), "--out", str(tmp / "out")],
    ],
    ids=["occ synth", "occ render", "moho_bridge.cli render", "occ_core.render"],
)
def test_a_process_count_below_one_is_a_usage_error_naming_the_option(tmp_path, args, processes):
    (tmp_path / "jobs.jsonl").write_text("")
    command, *argv = args(tmp_path)
    usage_error(CliRunner().invoke(command, [*argv, "--processes", processes]), "'--processes'")
    assert not (tmp_path / "synth").exists() and not (tmp_path / "out").exists()


def test_generate_refuses_zero_processes_before_writing(tmp_path):
    with pytest.raises(ValueError, match="processes must be >= 1, got 0"):
        synth.generate(synth.SynthConfig(out=tmp_path / "synth", n=1, splits=("test",)), processes=0)
    assert not (tmp_path / "synth").exists()
