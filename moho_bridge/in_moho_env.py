"""Runs inside MOHO's own environment (its python 3.9, torch, pytorch3d, manopth): no occ imports.

moho_bridge/moho.py starts it with MOHO_PYTHON, in the staging directory, with PYTHONPATH=MOHO_HOME:

    MOHO_PYTHON in_moho_env.py prep --data-dir W/data/obman/test --out W/cache/obman_test.pkl
    MOHO_PYTHON in_moho_env.py run MOHO_HOME/recontruct_3Dimage.py --conf W/moho.conf --mode test_image ...

``prep`` writes the IHOI-format hand cache MOHO's ObMan loader reads (``index``, ``hA``, ``hTo``,
``cTh``, ``cad_index``; docs/obman-moho.md B2-6) with MOHO's own ``models.hand_utils.extract_rt_pose``,
which needs MANO under ``externals/mano``. ``run`` executes the runner as ``__main__`` with
``CUDA_VISIBLE_DEVICES`` pinned: OCC's runner assigns ``"0,1,2"`` at import, which would override the GPU
the bridge chose.
"""

from __future__ import annotations

import argparse
import os
import pickle
import runpy
import sys
from pathlib import Path


class _PinnedEnviron(type(os.environ)):
    """os.environ that ignores assignments to CUDA_VISIBLE_DEVICES once it is set."""

    def __setitem__(self, key: str, value: str) -> None:
        if key == "CUDA_VISIBLE_DEVICES" and key in self:
            return
        super().__setitem__(key, value)


def run_runner(runner: Path, argv: list[str]) -> None:
    """Run MOHO's runner script as ``python runner argv...`` would, with the GPU choice pinned."""
    os.environ.__class__ = _PinnedEnviron
    sys.argv = [str(runner), *argv]
    sys.path.insert(0, str(runner.parent))
    runpy.run_path(str(runner), run_name="__main__")


def build_hand_cache(data_dir: Path, out: Path) -> int:
    """Hand articulation and hand-from-object transform of every staged meta, as MOHO's cache pickle.

    Returns:
        The number of samples written.
    """
    import torch
    from models.hand_utils import ManopthWrapper, extract_rt_pose

    wrapper = ManopthWrapper()
    cache: dict[str, list] = {"index": [], "cad_index": [], "hA": [], "hTo": [], "cTh": []}
    for meta_path in sorted((data_dir / "meta").glob("*.pkl")):
        # occ's restricted loader accepted every staged meta before it was linked here.
        with open(meta_path, "rb") as fh:
            meta = pickle.load(fh, encoding="latin1")
        c_t_h, h_a, c_t_o = extract_rt_pose(meta, wrapper)
        h_t_o = torch.matmul(torch.inverse(c_t_h), c_t_o)
        cache["index"].append(meta_path.stem)
        cache["cad_index"].append(f"{meta['class_id']}/{meta['sample_id']}")
        cache["hA"].append(h_a.detach().numpy()[0])
        cache["hTo"].append(h_t_o[0])  # a torch tensor: MOHO calls .unsqueeze on it
        cache["cTh"].append(c_t_h[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(cache, fh)
    os.replace(tmp, out)
    return len(cache["index"])


def main() -> None:
    # Python put this file's folder (moho_bridge) first on the path: it must not shadow MOHO's modules.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prep", help="write the hand cache pickle")
    prep.add_argument("--data-dir", type=Path, required=True)
    prep.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("run", help="run MOHO's runner with the GPU pinned")
    run.add_argument("runner", type=Path)
    args, rest = parser.parse_known_args()
    if args.command == "prep":
        print(f"hand cache: {build_hand_cache(args.data_dir, args.out)} samples -> {args.out}")
    else:
        run_runner(args.runner, rest)


if __name__ == "__main__":
    main()
