"""Evaluation in two processes (a gloo group on one CPU) against one process: every process evaluates its own
share of the questions, and the files, the metrics and the answers are those of one process evaluating them all.
The processes start with torch.multiprocessing (tests.helpers.spawn_processes) and join a gloo group over a file
store, as the one process of tests/test_sharding.py does."""

import json
import logging
from logging.handlers import BufferingHandler
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from demopsd.config.settings import EvalConfig, ShardingConfig
from demopsd.data.synthetic import generate_synthetic
from demopsd.evaluation.runner import PeriodicEvaluation
from demopsd.rollout.engine import GenerateEngine
from demopsd.runtime.sharding import fsdp_units, shard_model
from demopsd.training.timing import StepClock
from tests.fixed_step import default_tokenizer
from tests.helpers import spawn_processes, tiny_policy

pytestmark = pytest.mark.slow

# 5 + 3 questions in batches of 2: batches 0-2 of one dataset and 0-1 of the other, dealt in turn to two
# processes, give the first 3 batches (4 questions) and the second 2 (4 questions): shares of unequal size,
# and a dataset split between the processes. The first 3 questions of each are answered and all 5 probed, so a
# batch may be answered in part (batch 1 of the first dataset) or only probed (its batch 2).
CONFIG = EvalConfig(k=2, max_new_tokens=4, batch_size=2, max_examples=3, probe_examples=5)
STEP, SEED, TRAINING_SEED = 5, 3, 1234
FP32 = ShardingConfig(param_dtype="float32", reduce_dtype="float32", activation_checkpointing=False)


def datasets():
    """Two datasets of the leakage task, 5 and 3 questions."""
    return {"synthetic-inferable": generate_synthetic("inferable", "test", size=5),
            "synthetic-uninferable": generate_synthetic("uninferable", "test", size=3)}


def evaluate_in_process(rank: int, world: int, out_dir: Path, layouts: list[str]) -> None:
    """One process's part: :class:`PeriodicEvaluation` at step ``STEP`` of the tiny policy, for each of
    ``layouts`` (``replicated``: a whole copy per process; ``fsdp``: sharded over the processes with FSDP2);
    writes what it saw to ``out_dir/<layout>/rank<r>.json``, next to the evaluation's ``eval/``."""
    torch.set_num_threads(1)  # every process computes alike, so the answers can be compared exactly
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(str(out_dir / "store"), world), rank=rank,
                                world_size=world)
    logged = BufferingHandler(capacity=1000)
    logging.getLogger("demopsd.evaluation.evaluate").addHandler(logged)
    logging.getLogger("demopsd.evaluation.evaluate").setLevel(logging.INFO)
    try:
        tokenizer = default_tokenizer()
        for layout in layouts:
            logged.buffer.clear()
            policy = tiny_policy(tokenizer)
            if layout == "fsdp":
                shard_model(policy, init_device_mesh("cpu", (world,)), FP32)
                assert fsdp_units(policy)
            evaluation = PeriodicEvaluation(datasets(), CONFIG, out_dir / layout / "eval", seed=SEED)
            trainer = SimpleNamespace(global_step=STEP, is_global_zero=rank == 0, loggers=[])
            module = SimpleNamespace(policy=policy, tokenizer=tokenizer, clock=StepClock(),
                                     rollout_engine=GenerateEngine(policy, tokenizer))
            torch.manual_seed(TRAINING_SEED + rank)
            evaluation.evaluate(trainer, module)
            after = torch.rand(4).tolist()
            torch.manual_seed(TRAINING_SEED + rank)
            report = {"last_metrics": evaluation.last_metrics, "messages": [r.getMessage() for r in logged.buffer],
                      "training_stream_kept": after == torch.rand(4).tolist(), "excluded": module.clock.excluded}
            (out_dir / layout / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(directory: Path, world: int, layouts: list[str]) -> dict[str, tuple[Path, list[dict]]]:
    """Evaluate in ``world`` new processes; per layout, the step's output directory and each process's report."""
    spawn_processes(evaluate_in_process, (world, directory, layouts), world, directory)
    return {layout: (directory / layout / "eval" / f"step{STEP:06d}",
                     [json.loads((directory / layout / f"rank{rank}.json").read_text()) for rank in range(world)])
            for layout in layouts}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process evaluating everything, and two processes evaluating it with the policy replicated, then
    sharded (in one start of the two: starting processes takes most of this module's time)."""
    return {1: run(tmp_path_factory.mktemp("one"), 1, ["replicated"]),
            2: run(tmp_path_factory.mktemp("two"), 2, ["replicated", "fsdp"])}


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_two_processes_evaluate_their_shares_and_agree_with_one(runs, layout):
    (alone_dir, (alone,)), (shared_dir, reports) = runs[1]["replicated"], runs[2][layout]

    # the same answers, letter probabilities and metrics, to the last bit, whoever evaluated which question
    assert (shared_dir / "samples.jsonl").read_text() == (alone_dir / "samples.jsonl").read_text()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (alone_dir, shared_dir)]
    assert summaries[1] == summaries[0] and summaries[0]["step"] == STEP
    records = [json.loads(line) for line in (alone_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["idx"]) for r in records] == [
        (name, e.idx) for name, examples in datasets().items() for e in examples
    ]
    texts = [s["text"] for r in records for s in r.get("samples", [])]
    assert len(set(texts)) > len(texts) // 2, "sampled answers this alike would make the comparison weak"

    # each process evaluated only its share: batches 0 and 2 of the first dataset and 1 of the second, or the rest
    greedy = " × 2 sampled answers, plus a greedy one"
    assert [m for m in reports[0]["messages"] if m.startswith("Evaluating")] == [
        f"Evaluating synthetic-inferable: 2 questions{greedy}; the letter probe on 3 (3 of its 5 in this process)",
        f"Evaluating synthetic-uninferable: 1 question{greedy} (1 of its 3 in this process)",
    ]
    assert [m for m in reports[1]["messages"] if m.startswith("Evaluating")] == [
        f"Evaluating synthetic-inferable: 1 question{greedy}; the letter probe on 2 (2 of its 5 in this process)",
        f"Evaluating synthetic-uninferable: 2 questions{greedy} (2 of its 3 in this process)",
    ]
    assert [m for m in alone["messages"] if m.startswith("Evaluating")] == [
        f"Evaluating synthetic-inferable: 3 questions{greedy}; the letter probe on 5",
        f"Evaluating synthetic-uninferable: 3 questions{greedy}",
    ]

    # every process ends with the first one's metrics, its seconds included; they are the file's metrics
    assert reports[1]["last_metrics"] == reports[0]["last_metrics"]
    metrics = reports[0]["last_metrics"]
    assert metrics.pop("perf/eval_seconds") > 0
    assert metrics == summaries[0]["metrics"] == {k: v for k, v in alone["last_metrics"].items()
                                                  if k != "perf/eval_seconds"}
    assert (metrics["eval/synthetic-inferable/num_questions"], metrics["eval/synthetic-inferable/num_probed"]) == (3, 5)
    assert [set(r) - {"dataset"} for r in records if r["dataset"] == "synthetic-inferable"] == [
        {"idx", "answer", "samples", "greedy", "letter_probs"}] * 3 + [{"idx", "answer", "letter_probs"}] * 2
    assert {"letter_entropy", "greedy_accuracy"} <= {name.rsplit("/", 1)[1] for name in metrics}
    for report in (alone, *reports):  # evaluating leaves the training stream where it was, and out of the step time
        assert report["training_stream_kept"] and report["excluded"] > 0

