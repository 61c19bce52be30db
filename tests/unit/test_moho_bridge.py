"""moho_bridge without MOHO: discovery, probe, staging, conf, commands, output checks, and the depth
backend's geometry on hand-made inputs.

    .venv/bin/python -m pytest tests/unit/test_moho_bridge.py -q
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from moho_bridge import moho
from moho_bridge.depth import grid_mesh, hull_interval, mirror_hull
from moho_bridge.moho import Availability, MohoInstall, Staging
from moho_bridge.protocol import ReconResult, get_reconstructor
from occ_core.errors import BadSample, StageError
from occ_core.obman import SampleRef
from occ_core.render import view_filename

STANDIN_RUNNER = (
    Path(__file__).resolve().parents[1] / "data" / "moho_standin" / "home" / "recontruct_3Dimage.py"
)


def fake_install(root: Path, python_script: str = "exit 0") -> MohoInstall:
    """A MOHO_HOME with the files the probe checks, and a shell script as MOHO_PYTHON."""
    home = root / "home"
    for name in (moho.RUNNER, moho.BASE_CONF, moho.MANO_MODEL):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("dataset {\n    inner_iter = 10\n}\ntrain {\n    train_inner_iter = 8\n}\n")
    python = root / "python"
    python.write_text(f"#!/bin/sh\n{python_script}\n")
    python.chmod(0o755)
    ckpt = root / "ckpt.pth"
    ckpt.write_bytes(b"weights")
    return MohoInstall(home, python, ckpt)


def fake_samples(root: Path, ids: list[str], split: str = "test") -> list[SampleRef]:
    samples = [SampleRef(root / "obman", split, sid) for sid in ids]
    for sample in samples:
        for path in (sample.rgb_path, sample.segm_path, sample.meta_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(path.name.encode())
    return samples


def load_standin_conf_parser():
    spec = importlib.util.spec_from_file_location("standin_runner", STANDIN_RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_conf


# --- discovery and probe --------------------------------------------------------------------------


def test_discover_reads_the_environment():
    found = MohoInstall.discover(environ={"MOHO_HOME": "/m", "MOHO_PYTHON": "/m/py", "MOHO_CKPT": "/m/c.pth"})
    assert found == MohoInstall(Path("/m"), Path("/m/py"), Path("/m/c.pth"))


def test_discover_prefers_arguments_to_the_environment():
    found = MohoInstall.discover(home="/arg", environ={"MOHO_HOME": "/env"})
    assert found.home == Path("/arg")


def test_probe_names_every_missing_variable():
    assert moho.probe(MohoInstall(None, None, None)) == Availability(
        False, "MOHO_HOME, MOHO_PYTHON, MOHO_CKPT not set"
    )


def test_probe_names_the_one_missing_variable(tmp_path):
    install = fake_install(tmp_path)
    assert moho.probe(MohoInstall(install.home, install.python, None)).reason == "MOHO_CKPT not set"


def test_probe_reports_a_home_without_the_runner(tmp_path):
    install = fake_install(tmp_path)
    (install.home / moho.RUNNER).unlink()
    availability = moho.probe(install)
    assert not availability.ok and moho.RUNNER in availability.reason


def test_probe_reports_missing_mano(tmp_path):
    install = fake_install(tmp_path)
    (install.home / moho.MANO_MODEL).unlink()
    availability = moho.probe(install)
    assert not availability.ok and "MANO_RIGHT.pkl" in availability.reason


def test_probe_reports_the_failed_import(tmp_path):
    script = "echo \"ModuleNotFoundError: No module named 'pytorch3d'\" >&2; exit 1"
    availability = moho.probe(fake_install(tmp_path, script), device="cpu")
    assert availability == Availability(
        False,
        "MOHO_PYTHON cannot import MOHO's dependencies: ModuleNotFoundError: No module named 'pytorch3d'",
    )


def test_probe_times_out_on_a_hanging_interpreter(tmp_path):
    availability = moho.probe(fake_install(tmp_path, "exec sleep 30"), device="cpu", timeout_s=0.5)
    assert not availability.ok and "timed out" in availability.reason


def test_probe_requires_cuda_for_device_cuda(tmp_path):
    availability = moho.probe(fake_install(tmp_path, "echo False"), device="cuda")
    assert not availability.ok and "no CUDA device" in availability.reason


def test_probe_accepts_a_working_install_on_cpu(tmp_path):
    assert moho.probe(fake_install(tmp_path, "echo False"), device="cpu").ok


def test_probe_runs_the_import_check_with_moho_home_on_the_path(tmp_path):
    install = fake_install(tmp_path, 'echo "$PYTHONPATH" > "$(dirname "$0")/seen"; echo True')
    moho.probe(install, device="cuda")
    assert (tmp_path / "seen").read_text().strip() == str(install.home)


# --- staging --------------------------------------------------------------------------------------


def test_staging_links_inputs_under_the_upstream_path_tail(tmp_path):
    samples = fake_samples(tmp_path, ["00000007"])
    staging = moho.stage_inputs(samples, tmp_path / "work", fake_install(tmp_path))
    data = tmp_path / "work" / "data" / "obman" / "test"
    assert (data / "rgb" / "00000007.jpg").resolve() == samples[0].rgb_path.resolve()
    assert (data / "segm" / "00000007.png").resolve() == samples[0].segm_path.resolve()
    assert (data / "meta" / "00000007.pkl").resolve() == samples[0].meta_path.resolve()
    assert staging.data_dir == data.resolve()


def test_staging_writes_the_list_file_moho_reads(tmp_path):
    staging = moho.stage_inputs(
        fake_samples(tmp_path, ["00000001", "00000004"]), tmp_path / "w", fake_install(tmp_path)
    )
    lines = (tmp_path / "w" / "cache" / "obman_view_test_all.txt").read_text().splitlines()
    assert lines == [f"{sid}\t0\t0\t{staging.data_dir}/rgb/{sid}.jpg" for sid in ("00000001", "00000004")]


def test_staging_links_the_checkpoint_under_the_runners_name(tmp_path):
    install = fake_install(tmp_path)
    moho.stage_inputs(fake_samples(tmp_path, ["00000001"]), tmp_path / "w", install)
    assert (tmp_path / "w" / "exp" / "ckpt_SOMVideo_pre.pth").resolve() == install.ckpt.resolve()


def test_staging_links_externals_from_moho_home(tmp_path):
    install = fake_install(tmp_path)
    moho.stage_inputs(fake_samples(tmp_path, ["00000001"]), tmp_path / "w", install)
    assert (tmp_path / "w" / "externals" / "mano" / "MANO_RIGHT.pkl").is_file()


def test_staging_drops_samples_of_an_earlier_batch(tmp_path):
    install = fake_install(tmp_path)
    moho.stage_inputs(fake_samples(tmp_path, ["00000001", "00000002"]), tmp_path / "w", install)
    staging = moho.stage_inputs(fake_samples(tmp_path, ["00000003"]), tmp_path / "w", install)
    assert sorted(p.name for p in (staging.data_dir / "rgb").iterdir()) == ["00000003.jpg"]


def test_staging_refuses_a_directory_inside_moho_home(tmp_path):
    install = fake_install(tmp_path)
    with pytest.raises(StageError, match="must not be inside MOHO_HOME"):
        moho.stage_inputs(fake_samples(tmp_path, ["00000001"]), install.home / "scratch", install)


def test_staging_refuses_mixed_splits(tmp_path):
    samples = fake_samples(tmp_path, ["00000001"], "test") + fake_samples(tmp_path, ["00000002"], "train")
    with pytest.raises(StageError, match="one split"):
        moho.stage_inputs(samples, tmp_path / "w", fake_install(tmp_path))


def test_moho_view_name_is_the_render_stage_view_0_name(tmp_path):
    staging = Staging(tmp_path, "test", ("00000042",))
    assert staging.view_path("00000042").name == view_filename("00000042", "test", 0)


# --- conf -----------------------------------------------------------------------------------------


def test_generated_conf_appends_the_single_view_overrides(tmp_path):
    staging = Staging(tmp_path, "test", ("00000001",))
    text = moho.generate_conf("dataset {\n    inner_iter = 10\n}\n", moho.conf_overrides(staging))
    tail = text.split("# occ moho_bridge: single-view ObMan overrides\n")[1].splitlines()
    assert tail == [
        f'general.base_exp_dir = "{tmp_path}/exp"',
        'dataset.name = "multi_object_obman"',
        f'dataset.data_dir = "{tmp_path}/data/obman/test"',
        f'dataset.ref_dir = "{tmp_path}/data/obman/test"',
        f'dataset.cache_dir = "{tmp_path}/cache/obman_test.pkl"',
        "dataset.inner_iter = 1",
        "dataset.cat = 0",
        "dataset.ref_mask = true",
        "train.train_inner_iter = 1",
    ]


def test_generated_conf_overrides_the_upstream_values_when_read_like_hocon(tmp_path):
    base = (STANDIN_RUNNER.parent / moho.BASE_CONF).read_text()
    conf = load_standin_conf_parser()(
        moho.generate_conf(base, moho.conf_overrides(Staging(tmp_path, "test", ())))
    )
    assert (conf["dataset.inner_iter"], conf["train.train_inner_iter"]) == (1, 1)
    assert conf["general.base_exp_dir"] == f"{tmp_path}/exp"


# --- commands and runs ----------------------------------------------------------------------------


def test_runner_command_passes_moho_flags_and_counts_gpus(tmp_path):
    install = MohoInstall(tmp_path / "home", tmp_path / "py", tmp_path / "c.pth")
    staging = Staging(tmp_path / "w", "test", ())
    command = moho.step_command("test_image", staging, install, gpu="2,3", device="cuda")
    assert command[:4] == [str(install.python), str(moho.IN_MOHO_ENV), "run", str(install.home / moho.RUNNER)]
    assert command[4:] == [
        "--conf", str(staging.conf_path), "--case", "bridge", "--mode", "test_image",
        "--gpu_num", "2", "--device", "cuda",
    ]  # fmt: skip


def test_prep_command_writes_the_hand_cache_of_the_split(tmp_path):
    install = MohoInstall(tmp_path / "home", tmp_path / "py", tmp_path / "c.pth")
    command = moho.step_command("prep", Staging(tmp_path / "w", "val", ()), install, gpu="0", device="cuda")
    assert command[2:] == [
        "prep",
        "--data-dir",
        f"{tmp_path}/w/data/obman/val",
        "--out",
        f"{tmp_path}/w/cache/obman_val.pkl",
    ]


def test_moho_env_sets_the_gpu_and_drops_occs_python_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/occ/site")
    env = moho.moho_env(MohoInstall(tmp_path, None, None), gpu="1")
    assert (env["CUDA_VISIBLE_DEVICES"], env["PYTHONPATH"]) == ("1", str(tmp_path))


def test_run_logged_captures_stdout_and_stderr(tmp_path):
    run = moho.run_logged(
        ["sh", "-c", "echo out; echo err >&2"], tmp_path, os.environ, 30, tmp_path / "x.log", "s"
    )
    assert run.ok and ["out", "err"] == run.log_path.read_text().splitlines()[1:]


def test_run_logged_kills_on_timeout_and_says_so(tmp_path):
    run = moho.run_logged(["sleep", "30"], tmp_path, os.environ, 0.3, tmp_path / "x.log", "test_image")
    assert (run.timed_out, run.returncode, run.ok) == (True, None, False)
    assert run.describe().startswith("MOHO test_image timed out")


def test_run_logged_reports_the_exit_code(tmp_path):
    run = moho.run_logged(["sh", "-c", "exit 3"], tmp_path, os.environ, 30, tmp_path / "x.log", "prep")
    assert (run.returncode, run.timed_out) == (3, False) and "exited with 3" in run.describe()


# --- output checks --------------------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_check_view_accepts_a_256_rgb_render(tmp_path):
    pixels = np.zeros((256, 256, 3))
    pixels[100:150, 100:150] = 200
    assert moho.check_view(write_png(tmp_path / "v.png", pixels)) == tmp_path / "v.png"


def test_check_view_rejects_a_blank_render(tmp_path):
    with pytest.raises(BadSample, match="blank"):
        moho.check_view(write_png(tmp_path / "v.png", np.zeros((256, 256, 3))))


def test_check_view_rejects_a_wrong_size(tmp_path):
    with pytest.raises(BadSample, match="shape"):
        moho.check_view(write_png(tmp_path / "v.png", np.arange(128 * 128 * 3).reshape(128, 128, 3) % 255))


def test_check_view_rejects_a_missing_file(tmp_path):
    with pytest.raises(BadSample, match="no view"):
        moho.check_view(tmp_path / "absent.png")


def test_get_reconstructor_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="depth, oracle, moho"):
        get_reconstructor("nerf")


def test_moho_backend_refuses_to_run_unavailable(tmp_path, monkeypatch):
    for var in moho.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StageError, match="MOHO_HOME, MOHO_PYTHON, MOHO_CKPT not set"):
        get_reconstructor("moho").reconstruct([], tmp_path)


def test_failed_result_has_no_pose():
    with pytest.raises(ValueError, match="no pose"):
        ReconResult.failure("00000001", "/x", "broken").pose()


# --- depth backend geometry -----------------------------------------------------------------------


def test_hull_interval_finds_where_rays_cross_a_cube():
    cube = trimesh.creation.box(extents=(0.2, 0.2, 0.2)).vertices + [0.0, 0.0, 1.0]
    from scipy.spatial import ConvexHull

    entry, exit_ = hull_interval(ConvexHull(cube), np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert np.allclose([entry[0], exit_[0]], [0.9, 1.1]) and entry[1] > exit_[1]


def test_mirror_images_lie_behind_points_in_front_of_the_centre():
    points = np.array([[0.0, 0.0, 0.9], [0.05, 0.0, 0.92], [0.0, 0.05, 0.92], [0.05, 0.05, 0.95]])
    hull = mirror_hull(points, centre=np.array([0.0, 0.0, 1.0]))
    assert hull.points[4:, 2].min() > 1.0 and np.isclose(hull.points[4, 2], 1.1)


def test_grid_mesh_of_filled_pixels_is_closed_and_faces_outward():
    filled = np.zeros((256, 256), bool)
    filled[120:130, 100:140] = True
    filled[130:135, 100:110] = True  # an L, so the outline has a concave corner
    front, back = np.full(filled.shape, 0.6), np.full(filled.shape, 0.65)
    mesh = grid_mesh(front, back, np.full((256, 256, 3), 128, np.uint8), filled)
    mesh.merge_vertices()
    assert mesh.is_watertight and mesh.volume > 0


def test_moho_stage_key_follows_the_checkpoint_named_by_the_environment(tmp_path, monkeypatch):
    from moho_bridge.pipeline import ReconstructParams

    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    first.write_bytes(b"weights")
    second.write_bytes(b"other weights")
    params = ReconstructParams(root=tmp_path, backend="moho")
    monkeypatch.setenv("MOHO_CKPT", str(first))
    with_first = params.output_params()
    monkeypatch.setenv("MOHO_CKPT", str(second))
    assert params.output_params() != with_first
    second.write_bytes(b"retrained weights, new size")
    assert params.output_params() != with_first
