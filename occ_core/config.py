"""One typed settings object for the whole pipeline, overridden from the environment (``OCC_*``).

Stage parameters are separate pydantic models beside each stage (SynthConfig, SyncConfig, ...), so the
Prefect UI renders them as forms; these settings are what a machine or a deployment decides.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_workers() -> int:
    # I/O-bound transfers: many more threads than cores pay off, bounded so a laptop stays usable.
    return min(64, 16 * (os.cpu_count() or 2))


class Settings(BaseSettings):
    """Machine-level settings. Every field reads ``OCC_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="OCC_", frozen=True, extra="ignore")

    home: Path = Field(Path(".occ"), description="data root: every stage writes under HOME/<stage>/<key>")
    workers: int = Field(default_factory=_default_workers, ge=1, description="threads for S3 transfers")
    # Half the cores: on a CPU host llvmpipe already rasterises on every core (2 cores: one process beat
    # two, benchmarks/RESULTS.md); on a GPU host the other half encodes PNGs and feeds the driver
    # (16 cores: 8 processes did as well as 16).
    processes: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 1) // 2),
        ge=1,
        description="renderer processes of the render stage",
    )
    # Synthesis is mostly Python per frame (meshes, hand pose, visibility checks) beside its small
    # renders, so a process per core pays once a split has a few hundred frames (benchmarks/RESULTS.md).
    synth_processes: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="processes of the synthesis stage (default: every core)",
    )
    depth_convention: Literal["writer", "reader"] = Field(
        "writer",
        description="ObMan depth PNG direction: 'writer' (1 = nearest, obman_render) or 'reader' "
        "(255 = nearest, obman loaders)",
    )
    models: Path = Field(
        Path("models"),
        description="folder of local model checkpoints: preset internvl-1b loads MODELS/internvl-1b, ...",
    )
    gl_platform: Literal["egl", "osmesa"] = Field(
        "egl", description="PYOPENGL_PLATFORM for offscreen rendering when not already set"
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def field_help(model: type[BaseModel], name: str) -> str:
    """A config field's description, reused as its command-line help (one text for both)."""
    return model.model_fields[name].description or ""


def configure_offscreen_gl(settings: Settings | None = None) -> str:
    """Prepare the environment for a headless GL context before pyrender is imported; returns the platform.

    ``PYOPENGL_PLATFORM`` comes from ``OCC_GL_PLATFORM`` unless already set. pyglet (imported by
    pyrender for its viewer) otherwise loads X11 libraries, which GPU hosts without a display lack.
    """
    os.environ.setdefault("PYOPENGL_PLATFORM", (settings or get_settings()).gl_platform)
    os.environ.setdefault("PYGLET_HEADLESS", "1")
    return os.environ["PYOPENGL_PLATFORM"]


def data_root(settings: Settings | None = None) -> Path:
    """The data root (``OCC_HOME``, default ``./.occ``), made absolute."""
    return (settings or get_settings()).home.expanduser().resolve()
