"""The shipped submission templates: the Slurm script is valid bash, the KubeRay manifest a RayJob,
and every denseforge command in them is one the CLI accepts (`ray job submit` itself runs for real
in tests/integration/test_cluster.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from denseforge.pipeline.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VALUES = {"$CONFIG": "run.yaml", "$OUT": "s3://bucket/run", "$head_ip": "10.0.0.1", "$PORT": "6379"}


def _commands(text: str) -> list[list[str]]:
    """The denseforge invocations in a shell text, its variables given example values."""
    found = []
    for match in re.finditer(r"denseforge ((?:run|resume|status)[^;&|\n']*)", text):
        line = re.sub(r"\s*>.*$", "", match.group(1).replace('"', ""))  # no redirections
        for name, value in VALUES.items():
            line = line.replace(name, value)
        found.append(shlex.split(line))
    return found


def test_the_slurm_script_is_valid_bash_and_its_commands_parse():
    script = DEPLOY / "slurm" / "denseforge.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    commands = _commands(script.read_text())
    assert [c[0] for c in commands] == ["status", "resume", "run"]
    for command in commands:
        build_parser().parse_args(command)
    assert "--signal=B:TERM@" in script.read_text()  # the driver gets SIGTERM before the time limit


def test_the_kuberay_manifest_is_a_rayjob_whose_entrypoint_parses_and_holds_no_secret():
    manifest = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    commands = _commands(manifest["spec"]["entrypoint"])
    assert [c[0] for c in commands] == ["status", "resume", "run"]
    for command in commands:
        build_parser().parse_args(command)
    text = (DEPLOY / "kuberay" / "rayjob.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY:" not in text and "secretRef" in text
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert {"name": "DENSEFORGE_SCRATCH", "value": "/scratch"} in workers["env"]
