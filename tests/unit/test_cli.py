"""The occ dispatcher: every stage listed, stage modules loaded only when called, bad values as usage
errors."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from occ_core.cli import COMMANDS, main


def test_help_lists_every_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_help_imports_no_stage_module():
    code = "import sys; from occ_core.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "print(sorted(m for m in ('prefect', 'torch', 'pyrender', 'boto3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_value_out_of_range_is_a_usage_error_naming_the_field(tmp_path):
    result = CliRunner().invoke(main, ["render", "--root", str(tmp_path), "--views", "-1"])
    assert result.exit_code == 2
    assert "invalid RenderParams value: views" in result.output
