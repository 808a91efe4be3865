"""The record of what produced a run."""

import importlib.metadata
import json
import subprocess

import pytest
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from demopsd.runtime.provenance import git_revision, package_versions, write_provenance
from demopsd.config.run import TrainSettings
from demopsd.config.sections import PathsConfig
from demopsd.training.run import record_run_start
from tests.helpers import REPO_ROOT


def test_versions_are_the_installed_ones():
    versions = package_versions(("torch", "no-such-package-xyz"))
    assert versions == {"torch": importlib.metadata.version("torch"), "no-such-package-xyz": None}


def test_git_revision_of_a_repository_and_of_a_plain_directory(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    repo = tmp_path / "repo"
    (repo / "a.txt").write_text("1")
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *env, "-C", str(repo), "add", "a.txt"], check=True)
    subprocess.run(["git", *env, "-C", str(repo), "commit", "-qm", "x"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_revision(repo) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert git_revision(repo) == {"commit": head, "dirty": True}
    (tmp_path / "plain").mkdir()
    assert git_revision(tmp_path / "plain") == {"commit": None, "dirty": None}


def test_written_record_is_json(tmp_path):
    record = write_provenance(tmp_path / "provenance.json", REPO_ROOT)
    assert json.loads((tmp_path / "provenance.json").read_text()) == record
    assert record["packages"]["demopsd"] is not None and record["python"].count(".") == 2


@pytest.mark.parametrize("rank", [0, 1])
def test_only_the_first_process_records_the_run(tmp_path, monkeypatch, rank):
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    settings = TrainSettings(seed=3, paths=PathsConfig(root_dir=str(REPO_ROOT)), resolved={"seed": 3})
    record_run_start(settings, tmp_path, resumed_from=None)
    record_run_start(settings, tmp_path, resumed_from=tmp_path / "checkpoints" / "step=4.ckpt")
    written = {path.name for path in tmp_path.iterdir()}
    if rank == 0:
        assert written == {"config_resolved.yaml", "provenance.json", "provenance_resumed_step=4.json"}
        assert OmegaConf.load(tmp_path / "config_resolved.yaml") == settings.resolved
    else:
        assert written == set()
