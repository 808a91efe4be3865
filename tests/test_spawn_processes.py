"""tests.helpers.spawn_processes, which the two-process tests start their processes with: a failing process's log
comes back in the error, and only gloo's transport killing a process starts them again, once, with a new store."""

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import GLOO_TRANSPORT, spawn_processes

pytestmark = pytest.mark.slow  # each start imports torch in new processes

GLOO_ABORT = f"terminate called after throwing gloo::EnforceNotMet: [{GLOO_TRANSPORT}/address.cc:131] getpeername"


def attempt_number(workdir: Path, rank: int) -> int:
    """How many times this rank has started in ``workdir``, this time included."""
    starts = workdir / f"starts{rank}"
    count = int(starts.read_text()) + 1 if starts.exists() else 1
    starts.write_text(str(count))
    return count


def aborts_first(rank: int, workdir: Path, message: str, times: int) -> None:
    """Rank 1 writes ``message`` and aborts on its first ``times`` starts; then every rank notes whether the
    store file was there."""
    if rank == 1 and attempt_number(workdir, rank) <= times:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os.abort()
    (workdir / f"rank{rank}.done").write_text(str((workdir / "store").exists()))


def raises(rank: int, workdir: Path) -> None:
    attempt_number(workdir, rank)
    raise ValueError(f"rank {rank} found a bad value")


def test_a_process_that_gloo_aborted_starts_again_once_with_a_new_store(tmp_path):
    (tmp_path / "store").write_text("left by the aborted start")
    with pytest.warns(UserWarning, match="gloo's transport killed a process") as warned:
        spawn_processes(aborts_first, (tmp_path, GLOO_ABORT, 1), 2, tmp_path)
    assert "getpeername" in str(warned[0].message)  # the log of the aborted process is in the warning
    assert (tmp_path / "starts1").read_text() == "2"
    assert [(tmp_path / f"rank{r}.done").read_text() for r in range(2)] == ["False", "False"]


def test_an_abort_that_happens_again_is_raised_with_the_log(tmp_path):
    with pytest.raises(AssertionError, match="SIGABRT") as failure, pytest.warns(UserWarning):
        spawn_processes(aborts_first, (tmp_path, GLOO_ABORT, 2), 2, tmp_path)
    assert "--- rank 1:" in str(failure.value) and "getpeername" in str(failure.value)
    assert (tmp_path / "starts1").read_text() == "2"


def test_an_abort_outside_gloo_is_raised_at_once(tmp_path):
    with pytest.raises(AssertionError, match="a tensor of the wrong shape"):
        spawn_processes(aborts_first, (tmp_path, "a tensor of the wrong shape", 1), 2, tmp_path)
    assert (tmp_path / "starts1").read_text() == "1"


def test_an_exception_is_raised_at_once_with_its_traceback(tmp_path):
    with pytest.raises(AssertionError, match="found a bad value") as failure:
        spawn_processes(raises, (tmp_path,), 1, tmp_path)
    assert "ValueError" in str(failure.value)
    assert (tmp_path / "starts0").read_text() == "1"
