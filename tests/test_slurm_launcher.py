"""``hydra/launcher=slurm`` as submitted: the batch script Hydra's submitit launcher hands to ``sbatch`` for a
two-node DDP sweep asks for the trainer's nodes, one task and one GPU per device, and the time limit.

No SLURM here: stand-ins first on PATH, an ``srun`` (submitit looks for one before it submits) and an ``sbatch``
that keeps the script it is given and refuses the job, so the command stops right after submitting.
"""

import os
import re

from tests.helpers import run_python


def test_the_batch_script_asks_for_the_trainers_nodes_and_devices(tmp_path):
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {script}\necho "sbatch: error: no SLURM here" >&2'), ("srun", "")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\nexit 1\n")
        (bin_dir / name).chmod(0o755)

    result = run_python(
        "src/train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8",
        "seed=0,1", f"paths.log_dir={tmp_path / 'logs'}", "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=720",
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    assert result.returncode != 0 and "no SLURM here" in result.stdout + result.stderr
    lines = script.read_text().splitlines()
    sbatch_options = dict(re.fullmatch(r"#SBATCH --([\w-]+)=(.*)", line).groups()
                          for line in lines if line.startswith("#SBATCH --") and "=" in line)
    print("\n".join(lines))
    assert sbatch_options["nodes"] == "2"
    assert sbatch_options["ntasks-per-node"] == "8"  # one process per GPU, joined by Lightning's SLURM environment
    assert sbatch_options["gpus-per-node"] == "8"
    assert sbatch_options["time"] == "720"
    assert sbatch_options["partition"] == "gpu"
    assert sbatch_options["array"] == "0-1%2"  # the sweep's two jobs, both at once (array_parallelism is 64)
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "submitit.core._submit" in srun
