"""Stand-in for MOHO's models/hand_utils.py: ManopthWrapper and extract_rt_pose with MOHO's signatures.

No MANO model is evaluated: the hand frame is the mean of ``verts_3d`` with the camera's axes, enough
to give the cache pickle MOHO's shapes and types (hA numpy (45,), hTo/cTh torch 4x4).
"""

from __future__ import annotations

import os

import numpy as np
import torch

CAM_EXTR = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)


class ManopthWrapper:
    """Like MOHO's: needs the MANO model under ``mano_path`` (relative to the working directory)."""

    def __init__(self, mano_path: str = "externals/mano/") -> None:
        model = os.path.join(mano_path, "MANO_RIGHT.pkl")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"MANO model not found: {model}")


def extract_rt_pose(meta_info: dict, pose_wrapper: ManopthWrapper) -> tuple:
    """(cTh (1,4,4), art_pose (1,45), cTo (1,4,4)) as torch tensors, like MOHO's."""
    c_t_o = CAM_EXTR @ np.asarray(meta_info["affine_transform"], dtype=np.float32)
    w_t_h = np.eye(4, dtype=np.float32)
    w_t_h[:3, 3] = np.asarray(meta_info["verts_3d"], dtype=np.float32).mean(axis=0)
    c_t_h = CAM_EXTR @ w_t_h
    art_pose = torch.tensor(np.asarray(meta_info["pca_pose"], dtype=np.float32)[None])
    return torch.tensor(c_t_h[None]), art_pose, torch.tensor(c_t_o[None])
