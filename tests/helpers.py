"""Paths and small builders shared by the tests."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"
FIXTURE_DATA_DIR = REPO_ROOT / "tests" / "fixtures" / "data"
"""Made-up questions in the SciKnowEval layout, nine per domain (six train, three test; four- and two-option,
unicode, multi-line questions, option labels inside the text): the data every test reads unless
``DEMOPSD_DATA_DIR`` names a directory with the real splits (as ``make test`` does where one sits beside the checkout)."""


def data_dir() -> Path:
    """The directory the tests read SciKnowEval from: ``DEMOPSD_DATA_DIR`` (set to the fixtures by conftest.py
    when unset)."""
    return Path(os.environ["DEMOPSD_DATA_DIR"])


def real_data() -> bool:
    return data_dir().resolve() != FIXTURE_DATA_DIR.resolve()


def tiny_llama(vocab_size: int = 64, seed: int = 0):
    """A randomly initialised 2-layer Llama: a real HF causal LM that needs no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_policy(tokenizer, seed: int = 0):
    """A random 2-layer Llama over ``tokenizer``'s vocabulary, float32; the wide initialisation gives sharp,
    context-dependent distributions (teacher and student differ clearly, losses are far from 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train_tiny(log_dir, model_dir, *extra: str, hook: str | None = None,
               flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``src/train.py``: the laptop job, smoke-sized, on the tiny model, optionally with a
    ``tests/instrumented_train.py`` hook; ``flags`` go before the overrides (``-m`` for a sweep)."""
    overrides = [
        "experiment=leakage_laptop", "debug=smoke", f"model.name_or_path={model_dir}", f"paths.log_dir={log_dir}",
        "trainer.max_steps=4", "checkpoint.every_n_train_steps=2", "checkpoint.keep=-1",  # tests compare steps 2 and 4
        "checkpoint.save_final_model=false", "rollout.max_new_tokens=8",
        "optim.lr=1e-4",  # the tiny model's weights, and the EMA teacher's, move measurably in a few steps
        "logger.wandb.mode=offline", *extra,
    ]
    script = "tests/instrumented_train.py" if hook else "src/train.py"
    return run_python(script, *flags, *overrides,
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "DEMOPSD_TEST_HOOK": hook or ""})


def run_python(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """This interpreter in a new process, in the repository root, with this environment plus ``env``."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


GLOO_TRANSPORT = "gloo/transport/tcp"
"""In what a process writes when gloo's TCP transport aborts it: its listener can abort a process while the
processes connect (``getpeername`` failing, pytorch/pytorch#188266, open upstream), seen once in CI on a loaded
2-core machine. A process killed by a signal, its log naming gloo's transport, is started again once."""


def spawn_processes(fn, args: tuple, nprocs: int, workdir: Path) -> None:
    """``fn(rank, *args)`` in ``nprocs`` new processes (``torch.multiprocessing.spawn``), each one's stderr in
    ``workdir/rank<r>.log``. A process that fails raises an AssertionError with every process's last log lines.
    Once, and only when a process was killed by a signal and the logs name gloo's transport (:data:`GLOO_TRANSPORT`),
    the processes start again with a new store: their process group's FileStore must be ``workdir / "store"``;
    a failure that happens again is raised."""
    import warnings

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    for attempt in range(2):
        try:
            mp.spawn(_logged_process, args=(fn, workdir, *args), nprocs=nprocs, join=True)
            return
        except ProcessException as failure:
            logs = "\n".join(f"--- rank {rank}:\n" + _tail(workdir / f"rank{rank}.log") for rank in range(nprocs))
            if attempt == 0 and isinstance(failure, mp.ProcessExitedException) and GLOO_TRANSPORT in logs:
                warnings.warn(f"gloo's transport killed a process; starting them again:\n{logs}")
                (workdir / "store").unlink(missing_ok=True)
                continue
            raise AssertionError(f"{failure}\n{logs}") from failure


def _logged_process(rank: int, fn, workdir: Path, *args) -> None:
    with open(workdir / f"rank{rank}.log", "w") as log:
        os.dup2(log.fileno(), 2)  # the C++ side's messages too, an abort's among them
        fn(rank, *args)


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


@contextlib.contextmanager
def global_random_states():
    """Restore Python's, NumPy's and torch's global random states on exit (imported when first used, after
    tests/conftest.py has put this checkout's package first)."""
    from demopsd.runtime.randomness import random_states_kept

    with random_states_kept():
        yield


def compose_entry(config_name: str, overrides: list[str]):
    """The config ``src/<config_name>.py <overrides>`` runs with (conf/<config_name>.yaml, Hydra's compose API, in
    this process), the ``hydra:`` node kept; the config package is imported first, as the entry points do."""
    import importlib

    from hydra import compose, initialize_config_dir

    importlib.import_module("demopsd.config.store")  # the settings' defaults, as the entry points import them
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
