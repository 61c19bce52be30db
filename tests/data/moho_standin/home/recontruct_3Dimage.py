"""Stand-in for OCC-MLLM's MOHO runner: it honours the runner's contract and learns nothing.

Contract kept (docs/obman-moho.md B3, method-spec.md 7): the command line (``--conf --case --mode
--gpu_num --device``), ``CUDA_VISIBLE_DEVICES`` assigned at import, the conf with ``CASE_NAME``
replaced and later keys overriding earlier ones, the checkpoint loaded from
``general.base_exp_dir/ckpt_SOMVideo_pre.pth``, scenes found as ``data_dir/rgb/*.jpg`` and dropped
when they have fewer images than ``dataset.inner_iter``, the hand cache read from
``dataset.cache_dir``, the list file ``cache/obman_view_test_all.txt`` relative to the working
directory, and the outputs ``views_fine_test/{scene}_{ref}_{last 4 path parts}.png`` (mode test_image;
existing files skipped) and ``meshes_test2/{scene}.ply`` (mode test_mesh_single).

The view is the input image where segm channel 2 (OpenCV order) is 100, black elsewhere; the mesh is
a small cube in the object frame. Every invocation appends a JSON line to ``base_exp_dir/invocations.jsonl``.

Test hooks (environment): ``MOHO_STANDIN_HANG=1`` starts a sleeping child (pid in
``base_exp_dir/child.pid``) and sleeps; ``MOHO_STANDIN_BLANK=<id>`` writes a blank view for ``<id>``;
``MOHO_STANDIN_NO_FACES=<id>`` writes a mesh without faces for ``<id>``.
"""

import os

os.environ["CUDA_VISIBLE_DEVICES"] = "0,1,2"  # what OCC's runner does; the bridge must override it

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CUBE = np.array([[x, y, z] for x in (-0.1, 0.1) for y in (-0.1, 0.1) for z in (-0.1, 0.1)])
CUBE_FACES = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
              (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]  # fmt: skip


def parse_conf(text):
    """Flat ``{dotted.key: value}`` of the HOCON subset MOHO's confs use; later keys win."""
    flat, blocks = {}, []
    for raw in text.splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line == "}":
            blocks.pop()
        elif line.endswith("{"):
            blocks.append(line[:-1].strip())
        else:
            key, _, value = line.partition("=")
            flat[".".join([*blocks, key.strip()])] = parse_value(value.strip().rstrip(","))
    return flat


def parse_value(text):
    if text.startswith('"'):
        return json.loads(text)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "True": True, "False": False}.get(text, text)


def write_ply(path, vertices, faces):
    lines = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x",
             "property float y", "property float z", f"element face {len(faces)}",
             "property list uchar int vertex_indices", "end_header"]  # fmt: skip
    lines += [" ".join(f"{c:.6f}" for c in v) for v in vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--conf", type=str, default="./confs/moo_wmask_dp_hand_test.conf")
    parser.add_argument("--mode", type=str, default="test_image")
    parser.add_argument("--mcube_threshold", type=float, default=0.0)
    parser.add_argument("--is_continue", default=True, action="store_true")
    parser.add_argument("--case", type=str, default="finetuning")
    parser.add_argument("--gpu_num", type=int, default=1)
    parser.add_argument("--device", type=str, default="cuda")
    args = parser.parse_args()

    conf = parse_conf(Path(args.conf).read_text().replace("CASE_NAME", args.case))
    exp = Path(conf["general.base_exp_dir"])
    exp.mkdir(parents=True, exist_ok=True)
    with open(exp / "invocations.jsonl", "a") as fh:
        record = {"mode": args.mode, "case": args.case, "gpu_num": args.gpu_num, "device": args.device,
                  "cwd": os.getcwd(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
        fh.write(json.dumps(record) + "\n")

    if os.environ.get("MOHO_STANDIN_HANG"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (exp / "child.pid").write_text(str(child.pid))
        time.sleep(600)

    inner_iter = conf["dataset.inner_iter"]
    assert conf["train.train_inner_iter"] <= inner_iter, "train_inner_iter > inner_iter"
    if not (exp / "ckpt_SOMVideo_pre.pth").is_file():
        sys.exit(f"no checkpoint at {exp / 'ckpt_SOMVideo_pre.pth'}")
    with open(conf["dataset.cache_dir"], "rb") as fh:
        hand_cache = pickle.load(fh)
    data_dir = Path(conf["dataset.data_dir"])
    images = sorted(data_dir.glob("rgb/*.jpg"))
    counts = {}
    for image in images:
        counts[image.name[:8]] = counts.get(image.name[:8], 0) + 1
    scenes = sorted(scene for scene, n in counts.items() if n >= inner_iter)
    if not scenes:
        sys.exit(f"no scene has {inner_iter} images: the sampler is empty")
    missing = [scene for scene in scenes if scene not in hand_cache["index"]]
    if missing:
        sys.exit(f"hand cache has no entry for {missing}")

    if args.mode == "test_image":
        with open("cache/obman_view_test_all.txt") as fh:
            rows = [line.split("\t") for line in fh.read().split("\n") if line]
        (exp / "views_fine_test").mkdir(exist_ok=True)
        for scene, ref_idx, select_views, _img_path in rows:
            for view_idx in (int(v) for v in select_views.split(",")):
                source = sorted(data_dir.glob(f"rgb/{scene}*.jpg"))[view_idx]
                out = (
                    exp
                    / "views_fine_test"
                    / "{}_{}_{}_{}_{}_{}.png".format(scene, ref_idx, *source.parts[-4:])
                )
                if out.is_file():
                    continue
                rgb = np.asarray(Image.open(source).convert("RGB"))
                segm = np.asarray(Image.open(data_dir / "segm" / f"{scene}.png").convert("RGB"))
                view = rgb * (segm[:, :, :1] == 100)  # OpenCV channel 2 is PIL channel 0
                if os.environ.get("MOHO_STANDIN_BLANK") == scene:
                    view = np.zeros_like(rgb)
                Image.fromarray(view.astype(np.uint8)).save(out)
    elif args.mode == "test_mesh_single":
        (exp / "meshes_test2").mkdir(exist_ok=True)
        for scene in scenes:
            faces = [] if os.environ.get("MOHO_STANDIN_NO_FACES") == scene else CUBE_FACES
            write_ply(exp / "meshes_test2" / f"{scene}.ply", CUBE, faces)
    else:
        sys.exit(f"mode {args.mode} is not part of the stand-in")


if __name__ == "__main__":
    main()
