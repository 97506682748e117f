"""The producer SDK and CLI work where torch and diffusers are not installed."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=60)


def test_producer_imports_without_torch_or_diffusers() -> None:
    result = run(
        "import darkroom.producer as p, darkroom.producer.cli, darkroom.dev.embedded\n"
        "from darkroom.producer import Client, Img2ImgJob\n"
        "Img2ImgJob(model='m', image='s3://bkt/a.png', prompt='x')\n"
        "assert not {'torch', 'diffusers'} & set(sys.modules), sorted(sys.modules)\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_blocker_really_blocks_torch() -> None:
    result = run("import torch\n")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_cli_help_lists_commands_without_torch() -> None:
    result = run("import sys; sys.argv = ['darkroom', '--help']\nfrom darkroom.common.cli import main\nmain()\n")
    assert result.returncode == 0, result.stderr
    for command in ("submit", "status", "wait", "services", "worker"):
        assert command in result.stdout


def test_submit_reads_list_fields_from_a_job_file_and_flags_override(tmp_path: object) -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from darkroom.common import cli

    job = Path(str(tmp_path)) / "job.json"
    job.write_text('{"model": "m", "image": "s3://bkt/a.png", "prompt": "x", "strength": 7}')
    # strength from the file is out of range, so the refusal proves the file was read; the flag fixes it
    refused = CliRunner().invoke(cli.main, ["submit", "--job", str(job)])
    assert refused.exit_code != 0 and "strength" in refused.output
    bad_file = Path(str(tmp_path)) / "list.json"
    bad_file.write_text("[1, 2]")
    result = CliRunner().invoke(cli.main, ["submit", "--job", str(bad_file)])
    assert result.exit_code != 0 and "one JSON object" in result.output
