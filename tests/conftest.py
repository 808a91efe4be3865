"""Shared test setup: this checkout's package first, no Hugging Face hub access, a derandomized Hypothesis
profile, global random states restored after every test, and one conversion of the default model per session."""

import os
import sys
from pathlib import Path

from tests.helpers import FIXTURE_DATA_DIR, REPO_ROOT, global_random_states, tiny_policy

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported by any test module
# SciKnowEval for the tests and the runs they start: the repository's fixtures unless a real data directory is named
os.environ.setdefault("DEMOPSD_DATA_DIR", str(FIXTURE_DATA_DIR))

# The tests exercise this checkout's src/, not whatever `demopsd` the environment installed (an editable
# install of another checkout, say); tests/test_package_identity.py checks that the two agree.
SRC = REPO_ROOT / "src"
sys.path.insert(0, str(SRC))
if "demopsd" in sys.modules and not Path(sys.modules["demopsd"].__file__).resolve().is_relative_to(SRC):
    raise RuntimeError(f"demopsd was imported from {sys.modules['demopsd'].__file__} before tests/conftest.py "
                       f"could put {SRC} first on sys.path")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import demopsd.config.store  # noqa: E402,F401 - the settings' defaults, which conf/ extends, for every composition

# The same examples on every run (derandomize, which also turns off the example database), and no timing
# limits: a shared 2-core CI machine can take seconds for an example that takes milliseconds on a laptop.
settings.register_profile("demopsd", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("demopsd")


@pytest.fixture(autouse=True)
def restore_global_random_states():
    """A test that seeds or draws from the global generators leaves them as it found them for the next test."""
    with global_random_states():
        yield


@pytest.fixture(autouse=True)
def restore_environment():
    """A test that changes ``os.environ`` leaves it as it found it: the subprocesses later tests start inherit it,
    and a leftover ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (which the vLLM engine sets for itself in a process
    group) makes a two-process run wait for processes that never come."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def no_process_group_left_behind():
    """A module that opens a torch.distributed process group must close it, or later modules inherit it."""
    yield
    dist = sys.modules.get("torch.distributed")  # never imported: no group can be open
    assert dist is None or not (dist.is_available() and dist.is_initialized()), "a process group was left open"


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """A cache root holding the converted default model, and the GGUF-loaded model it came from.

    Returns ``(cache_root, gguf_model)``; pass ``cache_dir=cache_root`` to
    ``load_model_and_tokenizer("smollm2-135m-instruct", ...)`` to load the converted copy.
    """
    from demopsd.runtime.models import default_cache_path, load_default_gguf, save_atomically

    root = tmp_path_factory.mktemp("demopsd-cache")
    with global_random_states():  # session fixtures run outside any test's restore_global_random_states
        model, tokenizer = load_default_gguf()
    save_atomically(model, tokenizer, default_cache_path(root))
    return root, model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_cache):
    """A randomly initialised 2-layer Llama with the default model's tokenizer: steps take milliseconds and
    checkpoints a few MB, so killed and resumed runs are cheap, while every code path is the real one."""
    from transformers import AutoTokenizer

    from demopsd.runtime.models import default_cache_path

    tokenizer = AutoTokenizer.from_pretrained(default_cache_path(default_model_cache[0]))
    directory = tmp_path_factory.mktemp("tiny-model")
    with global_random_states():
        tiny_policy(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
