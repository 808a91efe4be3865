"""W&B online exactly where ``wandb`` itself has a login, on any server: a netrc entry for a self-hosted host with
``WANDB_BASE_URL`` or with the host ``wandb login --host`` saved; offline otherwise, with one line saying why.

Each case runs in a fresh interpreter with a temporary HOME (``wandb`` reads its settings once per process), and
nothing reaches any server: deciding the mode only reads files and the environment.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

SERVER = "https://wandb.example.com"
KEY = "local-" + "0123456789abcdef" * 3  # the shape of a self-hosted server's API key (40+ characters)

DECIDE = """
import json
from demopsd.runtime.loggers import resolve_wandb_mode
print(json.dumps(resolve_wandb_mode("auto")))
"""


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def with_netrc(home, machine: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / ".netrc").write_text(f"machine {machine}\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)


def with_saved_host(home, url: str) -> None:
    """What ``wandb login --host <url>`` leaves in W&B's settings beside the netrc entry."""
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(f"[default]\nbase_url = {url}\n")


def python(code: str, home, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter whose W&B knows only ``home`` and ``env`` (no key, mode or netrc inherited)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**inherited, "HOME": str(home), "WANDB_SILENT": "true", **env})


def decide(home, **env: str) -> tuple[str, str]:
    result = python(DECIDE, home, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def test_a_netrc_entry_for_a_self_hosted_server_named_by_wandb_base_url_is_a_login(home):
    with_netrc(home, "wandb.example.com")
    assert decide(home, WANDB_BASE_URL=SERVER) == ("online", f"logged in to {SERVER}")


def test_the_server_wandb_login_saved_is_the_one_looked_up(home):
    with_netrc(home, "wandb.example.com")
    with_saved_host(home, SERVER)
    assert decide(home) == ("online", f"logged in to {SERVER}")


def test_a_login_for_another_server_is_no_login_and_the_reason_names_the_server(home):
    with_netrc(home, "wandb.example.com")
    mode, why = decide(home, WANDB_BASE_URL="https://wandb.other.example.org")
    assert mode == "offline"
    assert "no login for https://wandb.other.example.org" in why
    assert "wandb login --host https://wandb.other.example.org" in why


def test_an_api_key_in_the_environment_is_a_login_for_whatever_server(home):
    assert decide(home, WANDB_BASE_URL=SERVER, WANDB_API_KEY=KEY) == ("online", f"logged in to {SERVER}")


def test_an_identity_token_file_is_a_login(home, tmp_path):
    token = tmp_path / "token.jwt"
    token.write_text("header.payload.signature")
    assert decide(home, WANDB_BASE_URL=SERVER, WANDB_IDENTITY_TOKEN_FILE=str(token))[0] == "online"


def test_a_malformed_key_is_no_login_and_says_what_is_wrong(home):
    mode, why = decide(home, WANDB_BASE_URL=SERVER, WANDB_API_KEY="short")
    assert mode == "offline" and "unusable" in why and "WANDB_API_KEY" in why


def test_wandb_mode_in_the_environment_wins_and_is_named(home):
    with_netrc(home, "wandb.example.com")
    assert decide(home, WANDB_BASE_URL=SERVER, WANDB_MODE="offline") == (
        "offline", "WANDB_MODE=offline in the environment")


def test_an_offline_run_says_why_in_one_line(home, tmp_path):
    """A run with no login for its server starts offline and its log line names the server and how to log in."""
    code = f"""
import logging
from omegaconf import OmegaConf
from demopsd.runtime.loggers import make_wandb_logger, finish_wandb
logging.basicConfig(level=logging.INFO)
cfg = OmegaConf.create({{"mode": "auto", "project": "p", "entity": None, "group": None, "job_type": "t", "tags": []}})
logger = make_wandb_logger(cfg, save_dir={str(tmp_path / "run")!r}, run_name="r", config={{}})
assert logger is not None and logger.experiment.offline
finish_wandb([logger])
"""
    result = python(code, home, WANDB_BASE_URL=SERVER, WANDB_DIR=str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "W&B is offline" in line]
    assert f"wandb has no login for {SERVER} (`wandb login --host {SERVER}`" in line
    assert "wandb sync" in line
