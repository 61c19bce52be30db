"""Contract test of the moho backend: the real subprocess path against a stand-in MOHO.

The stand-in (tests/data/moho_standin, laid out by tests/fixtures/moho_standin.py) honours the
command line, conf, list file, hand cache and output names of OCC-MLLM's ``recontruct_3Dimage.py``, and
assigns ``CUDA_VISIBLE_DEVICES=0,1,2`` at import as that runner does. What is checked here is the
bridge's side of the contract: staging layout and names, conf keys, environment, timeout, logs, output
validation and provenance.

    .venv/bin/python -m pytest tests/integration/test_moho_contract.py -q
"""

from __future__ import annotations

import json
import pickle
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moho_bridge import moho
from moho_bridge.moho import MohoReconstructor, Staging
from moho_bridge.pipeline import MohoOptions, RenderParams, render_split
from occ_core import obman
from occ_core.fsio import sha256_file
from occ_core.render import view_filename
from tests.fixtures.moho_standin import make_moho_home

pytestmark = pytest.mark.integration

GPU = "3"


def backend_for(install, **options) -> MohoReconstructor:
    options = {"gpu": GPU, "device": "cpu", "timeout_s": 120.0} | options
    return MohoReconstructor(home=install.home, python=install.python, ckpt=install.ckpt, **options)


@pytest.fixture(scope="module")
def test_split(tiny_obman):
    return obman.list_samples(tiny_obman, "test")


@pytest.fixture(scope="module")
def moho_run(tiny_obman, test_split, tmp_path_factory):
    """One successful run of the stand-in over the test split."""
    install = make_moho_home(tmp_path_factory.mktemp("moho"))
    out = tmp_path_factory.mktemp("moho_out")
    backend = backend_for(install)
    results = backend.reconstruct(test_split, out)
    staging = Staging((out / "moho_work").resolve(), "test", tuple(s.sample_id for s in test_split))
    invocations = [
        json.loads(line) for line in (staging.exp_dir / "invocations.jsonl").read_text().splitlines()
    ]
    return SimpleNamespace(
        install=install, out=out, backend=backend, results=results, staging=staging, invocations=invocations
    )


def test_every_sample_gets_a_mesh_and_a_view0(moho_run, test_split):
    assert [r.ok for r in moho_run.results] == [True] * len(test_split)
    assert all(r.mesh_path.is_file() and r.view0_path.is_file() for r in moho_run.results)


def test_results_carry_the_ground_truth_pose(moho_run, test_split):
    expected = obman.object_to_camera(obman.load_meta(test_split[0].meta_path))
    assert np.allclose(moho_run.results[0].pose(), expected)


def test_inputs_are_linked_under_the_upstream_path_tail(moho_run, test_split):
    data = moho_run.staging.workdir / "data" / "obman" / "test"
    sample = test_split[0]
    links = [
        data / "rgb" / f"{sample.sample_id}.jpg",
        data / "segm" / f"{sample.sample_id}.png",
        data / "meta" / f"{sample.sample_id}.pkl",
    ]
    assert [p.resolve() for p in links] == [
        p.resolve() for p in (sample.rgb_path, sample.segm_path, sample.meta_path)
    ]


def test_moho_views_carry_the_s3_naming(moho_run, test_split):
    names = sorted(p.name for p in (moho_run.staging.exp_dir / "views_fine_test").iterdir())
    assert names == sorted(f"{s.sample_id}_0_obman_test_rgb_{s.sample_id}.jpg.png" for s in test_split)


def test_runner_ran_image_then_mesh_mode_in_the_staging_dir(moho_run):
    seen = [(i["mode"], i["case"], i["device"], i["cwd"]) for i in moho_run.invocations]
    workdir = str(moho_run.staging.workdir)
    assert seen == [("test_image", "bridge", "cpu", workdir), ("test_mesh_single", "bridge", "cpu", workdir)]


def test_gpu_choice_survives_the_runners_hardcoded_devices(moho_run):
    assert {i["CUDA_VISIBLE_DEVICES"] for i in moho_run.invocations} == {GPU}


def test_runner_reads_single_view_settings_from_the_generated_conf(moho_run):
    conf = moho_run.staging.conf_path.read_text()
    assert "dataset.inner_iter = 1" in conf and "train.train_inner_iter = 1" in conf
    assert f'dataset.data_dir = "{moho_run.staging.data_dir}"' in conf


def test_hand_cache_has_the_types_moho_reads(moho_run, test_split):
    with open(moho_run.staging.cache_path, "rb") as fh:
        cache = pickle.load(fh)
    assert cache["index"] == [s.sample_id for s in test_split]
    assert isinstance(cache["hTo"][0], torch.Tensor) and tuple(cache["hTo"][0].shape) == (4, 4)
    assert isinstance(cache["hA"][0], np.ndarray) and cache["hA"][0].shape == (45,)


def test_every_step_has_its_log(moho_run, test_split):
    logs = {step: moho_run.staging.log_path(step).read_text() for step in moho.STEPS}
    assert f"hand cache: {len(test_split)} samples" in logs["prep"]
    assert logs["test_image"].startswith("$ ") and "--mode test_image" in logs["test_image"].splitlines()[0]


def test_provenance_records_commit_checkpoint_and_conf(moho_run):
    provenance = moho_run.backend.provenance()
    commit = subprocess.run(
        ["git", "-C", str(moho_run.install.home), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (provenance["backend"], provenance["moho_commit"]) == ("moho", commit)
    assert provenance["ckpt_sha256"] == sha256_file(moho_run.install.ckpt)
    assert provenance["conf_sha256"] == moho.conf_hash(moho_run.staging)


def test_conf_hash_does_not_depend_on_the_scratch_dir(moho_run, test_split, tmp_path):
    other = moho.stage_inputs(test_split, tmp_path / "elsewhere", moho_run.install)
    assert moho.conf_hash(other) == moho.conf_hash(moho_run.staging)


# --- probe ----------------------------------------------------------------------------------------


def test_probe_accepts_the_standin_on_cpu(moho_standin):
    assert moho.probe(moho_standin, device="cpu").ok


def test_probe_rejects_cuda_when_the_environment_has_no_gpu(moho_standin):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no CUDA device" in moho.probe(moho_standin, device="cuda").reason


# --- faults ---------------------------------------------------------------------------------------


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_timeout_kills_a_hanging_runner_and_its_children(moho_standin, test_split, tmp_path, monkeypatch):
    monkeypatch.setenv("MOHO_STANDIN_HANG", "1")
    backend = backend_for(moho_standin, timeout_s=10.0)
    results = backend.reconstruct(test_split[:1], tmp_path)
    child = int((tmp_path / "moho_work" / "exp" / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:  # the orphan is reaped asynchronously
        time.sleep(0.1)
    assert (backend.runs[-1].timed_out, backend.runs[-1].returncode) == (True, None)
    assert "MOHO test_image timed out" in results[0].error and not running(child)


@pytest.fixture(scope="module")
def faulty_outputs(tiny_obman, test_split, tmp_path_factory):
    """Results of a stand-in run that writes a blank view for sample 0 and a face-less mesh for sample 1."""
    install = make_moho_home(tmp_path_factory.mktemp("moho_faulty"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOHO_STANDIN_BLANK", test_split[0].sample_id)
        patch.setenv("MOHO_STANDIN_NO_FACES", test_split[1].sample_id)
        return backend_for(install).reconstruct(test_split[:3], tmp_path_factory.mktemp("faulty_out"))


def test_blank_view_is_rejected(faulty_outputs):
    assert (faulty_outputs[0].ok, faulty_outputs[0].error) == (False, "MOHO view is blank")


def test_mesh_without_faces_is_rejected(faulty_outputs):
    assert (faulty_outputs[1].ok, faulty_outputs[1].error) == (False, "mesh has no faces")


def test_a_rejected_output_fails_only_its_sample(faulty_outputs):
    assert faulty_outputs[2].ok


# --- occ render --backend moho --------------------------------------------------------------------


def test_render_uses_mohos_view0_and_renders_orbit_views_from_its_mesh(moho_standin, tiny_obman, tmp_path):
    options = MohoOptions(
        home=moho_standin.home, python=moho_standin.python, ckpt=moho_standin.ckpt, device="cpu"
    )
    params = RenderParams(
        root=tiny_obman, backend="moho", moho=options, limit=2, views=1, processes=1, out=tmp_path
    )
    summary = render_split(params)
    sid = obman.list_samples(tiny_obman, "test")[0].sample_id
    moho_view = tmp_path / "meshes" / "moho_views" / view_filename(sid, "test", 0)
    assert summary["rendered"] == 2 and (tmp_path / view_filename(sid, "test", 1)).is_file()
    assert (tmp_path / view_filename(sid, "test", 0)).read_bytes() == moho_view.read_bytes()
