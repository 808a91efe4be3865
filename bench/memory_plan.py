"""Each process's GPU memory in one training step, planned on a CPU: does a preset fit a card before anyone rents one?

    python bench/memory_plan.py                                     # both presets, their default budgets
    python bench/memory_plan.py --preset qwen3-8b --micro-batch-tokens 10240 20480 --gpu-memory-utilization 0.3 0.5
    python bench/memory_plan.py --calibrate                         # the plan against measured CPU steps

The step is this project's: the student's forward with gradient (``response_hidden_states``), the EMA teacher's
forward under ``no_grad`` on the same response after a longer, privileged prompt (a second copy of the model,
``make_ema_teacher``, sharded the same way), ``chunked_distillation_loss`` (DemoPSD's defaults), backward, AdamW
(fp32 master weights and moments, ``foreach`` as torch picks it on GPUs), the EMA update, ``zero_grad``. It runs under
``FakeTensorMode`` (shapes and dtypes, no data, no arithmetic) with a fake process group of the preset's world size
and a CPU device mesh; ``shard_model`` shards both models as the ``fsdp`` settings say (FSDP2, bf16
gathered weights, fp32 gradient reduction, activation checkpointing); torch's ``FSDPMemTracker`` records the peak of
each category. The model is built from Qwen3's published shapes alone (nothing downloaded), all its layers.

The micro-batch is a token budget per process (``memory.micro_batch_tokens``): as many whole rows of ``prompt +
response`` padded tokens as the budget holds. The step planned is the last micro-batch of an optimizer step: AdamW's
moments exist and the gradients of the earlier micro-batches are being accumulated. Every response token is real and
distilled (no padding inside responses, every rollout has a context), the teacher's prompt is as long as a prompt and
a full-length demonstration together, and prompts are left-padded (the attention mask is built): the most memory.

Beside the trainer, each GPU holds a colocated vLLM engine (tensor parallel 1: the whole model in bf16, plus a KV
cache): ``gpu_memory_utilization`` × the card is its budget. With sleep mode (``rollout.sleep_level=2``: weights and
KV cache freed while the trainer runs, the weights pushed again before the next generation) the engine's budget must
fit beside the trainer's state between steps (the trainer's cached blocks handed back first), and the trainer's peak
beside what the engine keeps asleep; without it, the engine's whole budget beside the trainer's peak. An evaluation
keeps the engine awake beside the trainer's state and the whole policy gathered in bf16 (the letter probe and the
entropy run the policy itself), which bounds the engine's share on 80 GB cards. What is no
tensor of the trainer's (CUDA context, NCCL, cuBLAS, the caching allocator's slack, vLLM's own activations and CUDA
graphs) comes from the command-line margins, which are estimates: nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.tensor._sharding_prop as sharding_propagation  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType  # noqa: E402
from torch.distributed._tools.mem_tracker import _RefType  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config  # noqa: E402

from demopsd.config.objectives import DistillationConfig  # noqa: E402
from demopsd.config.settings import ShardingConfig  # noqa: E402
from demopsd.objectives import aggregation_weights, chunked_distillation_loss  # noqa: E402
from demopsd.rollout.batch import PromptBatch  # noqa: E402
from demopsd.rollout.forward import lm_head_weight, response_hidden_states  # noqa: E402
from demopsd.runtime.sharding import reshard, shard_model  # noqa: E402
from demopsd.training.teacher import ema_update, make_ema_teacher  # noqa: E402

GIB = 2**30
MIB = 2**20
BF16 = 2
OBJECTIVE = DistillationConfig()  # DemoPSD's defaults: top-100 + tail bucket, JSD α = 0.5
EMA_RATE = 0.05
CHUNK_SIZE = 512  # DistillationStep's default

QWEN3 = {"rope_theta": 1e6, "bos_token_id": 151_643, "eos_token_id": 151_645}
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
ARCHITECTURES = {  # Qwen3's published config.json shapes; the "small" ones calibrate on a CPU, "tiny" is for the tests
    "qwen3-8b": dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **QWEN3),
    "qwen3-1.7b": dict(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **QWEN3),
    "small": dict(vocab_size=32_768, **SMALL),
    "small-vocab": dict(vocab_size=4096, **SMALL),  # the decoder's memory outweighs the loss's, as in Qwen3-8B
    # every weight's first dimension divides by 2 and 4: no padded shards, so the categories have closed forms
    "tiny": dict(vocab_size=1024, hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1),
}
CARDS = {"80 GB (79.1 GiB)": 79.11 * GIB, "141 GB (139.8 GiB)": 139.80 * GIB}
"""Total memory as CUDA reports it (an H100 80 GB HBM3, an H200): what ``gpu_memory_utilization`` is a share of."""

CATEGORIES = {  # the plan's categories ← FSDPMemTracker's
    "sharded params": ("Sharded Param", "Buffer"),
    "gathered params": ("Unsharded Param", "All Gather"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer": ("OptState",),
    "activations": ("Activation", "Inputs"),
    "teacher": ("Teacher",),
    "temporary": ("Temp",),
}
Category = _RefType("Category", [(m.name, m.value) for m in _FSDPRefType] + [("TEACHER", "Teacher")])
"""FSDPMemTracker's reference types and one more, for everything of the EMA teacher."""


@dataclass(frozen=True)
class Preset:
    """A training preset: its model, processes (one per GPU), rollouts per step and lengths."""

    architecture: str
    world_size: int
    batch_size: int
    n: int
    prompt_tokens: int
    response_tokens: int

    @property
    def row_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def rollouts_per_process(self) -> int:
        return self.batch_size * self.n // self.world_size


PRESETS = {  # conf/experiment/sdpo_paper_qwen3_8b.yaml, and the 1.7B on one GPU at the same lengths
    "qwen3-8b": Preset("qwen3-8b", world_size=8, batch_size=32, n=8, prompt_tokens=2048, response_tokens=8192),
    "qwen3-1.7b": Preset("qwen3-1.7b", world_size=1, batch_size=32, n=8, prompt_tokens=2048, response_tokens=8192),
}


@dataclass(frozen=True)
class Workload:
    """One micro-batch on one process: ``rows`` × (``prompt_tokens`` + ``response_tokens``) for the student; the
    teacher reads the same responses after ``teacher_prompt_tokens`` of privileged prompt."""

    architecture: str
    world_size: int
    rows: int
    prompt_tokens: int
    response_tokens: int
    teacher_prompt_tokens: int


@dataclass
class Plan:
    """Bytes per category (:data:`CATEGORIES`) at the step's peak, the phase of :func:`training_step` it came in,
    bytes per category after the step (between steps), and the seconds the plan took."""

    peak: dict[str, int]
    peak_phase: str
    between_steps: dict[str, int]
    seconds: float

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak.values())

    @property
    def between_steps_bytes(self) -> int:
        return sum(self.between_steps.values())


# --- building and running the step (the same code with fake and with real tensors) -----------------------------------


def qwen3(architecture: str) -> Qwen3Config:
    return Qwen3Config(**ARCHITECTURES[architecture])


def sharded_models(config: Qwen3Config, mesh: DeviceMesh) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The policy (fp32, training mode) and its EMA teacher, both sharded over ``mesh`` by ``shard_model`` with the
    fsdp section's defaults. Built, copied and sharded on the meta device (a fake tensor cannot be deep-copied), then
    made in the current mode (fake or real) and initialised; the teacher starts as the policy's copy."""
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    policy.train()
    teacher = make_ema_teacher(policy)
    for model in (policy, teacher):
        shard_model(model, mesh, ShardingConfig())
        model.to_empty(device="cpu")
    policy.apply(policy._init_weights)
    ema_update(teacher, policy, 1.0)
    return policy, teacher


def adamw(policy: PreTrainedModel) -> torch.optim.AdamW:
    """AdamW as ``configure_optimizers`` makes it, with ``foreach`` as torch picks it for GPU tensors."""
    return torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)


def start_accumulating(policy: PreTrainedModel, optimizer: torch.optim.Optimizer) -> None:
    """The state of the last micro-batch of an optimizer step: AdamW's moments exist (an update on zero gradients
    makes them) and every sharded gradient holds the earlier micro-batches' sum."""
    for parameter in policy.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()


@dataclass
class MicroBatch:
    """The student's prompt ``[B, P]``, the teacher's ``[B, P_t]``, the response ids and mask ``[B, R]``."""

    prompt: PromptBatch
    teacher_prompt: PromptBatch
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.prompt.ids, self.prompt.mask, self.teacher_prompt.ids, self.teacher_prompt.mask,
                self.response_ids, self.response_mask)


def left_padded(rows: int, width: int, vocab: int) -> PromptBatch:
    """Random prompt ids ``[rows, width]``, the first row one token shorter (left padding), so that the model builds
    its attention mask as it does on real, uneven prompts."""
    ids = torch.randint(0, vocab, (rows, width))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    return PromptBatch(ids=ids, mask=mask)


def micro_batch(workload: Workload, vocab: int) -> MicroBatch:
    """Random tokens in ``workload``'s shapes; every response token is real."""
    response_ids = torch.randint(0, vocab, (workload.rows, workload.response_tokens))
    return MicroBatch(prompt=left_padded(workload.rows, workload.prompt_tokens, vocab),
                      teacher_prompt=left_padded(workload.rows, workload.teacher_prompt_tokens, vocab),
                      response_ids=response_ids, response_mask=torch.ones_like(response_ids))


def training_step(policy: PreTrainedModel, teacher: PreTrainedModel, optimizer: torch.optim.Optimizer,
                  batch: MicroBatch, phase: Callable[[str], AbstractContextManager]) -> None:
    """Student forward, teacher forward, the chunked DemoPSD loss on the ``B·R`` response positions, backward, AdamW,
    the EMA update, ``zero_grad``, as ``DistillationStep`` and the LightningModule run them; each inside
    ``phase(name)``, named "student forward", "teacher forward", "loss", "backward", "optimizer"."""
    with phase("student forward"):
        student_hidden = response_hidden_states(policy, batch.prompt, batch.response_ids, batch.response_mask)
    with phase("teacher forward"), torch.no_grad():
        teacher_hidden = response_hidden_states(teacher, batch.teacher_prompt, batch.response_ids,
                                                batch.response_mask)
    with phase("loss"):
        valid = batch.response_mask.bool()
        weights = aggregation_weights(batch.response_mask, OBJECTIVE.aggregation)[valid]
        loss, _ = chunked_distillation_loss(
            student_hidden[valid], lm_head_weight(policy), teacher_hidden[valid], lm_head_weight(teacher).detach(),
            batch.response_ids[valid], weights, OBJECTIVE, chunk_size=CHUNK_SIZE,
        )
        reshard(teacher)
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
        ema_update(teacher, policy, EMA_RATE)
        optimizer.zero_grad(set_to_none=True)


class StepTracker(FSDPMemTracker):
    """``FSDPMemTracker`` on the policy and its optimizer, with everything of the EMA teacher in a category of its
    own (its sharded weights and buffers, and what its forward allocates: gathered weights, activations, output), and
    the phase of :func:`training_step` in which the peak came."""

    def __init__(self, policy: PreTrainedModel, optimizer: torch.optim.Optimizer, teacher: PreTrainedModel) -> None:
        super().__init__(policy, optimizer)
        self._ref_class = Category
        self._teacher = teacher
        self._phase = self.peak_phase = ""

    def __enter__(self) -> StepTracker:
        super().__enter__()
        for tensor in (*(p.to_local() for p in self._teacher.parameters()), *self._teacher.buffers()):
            self._update_and_maybe_create_winfos(tensor, Category.TEACHER)
        return self

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Inside, the step is in phase ``name``; in the teacher's forward every new allocation is the teacher's."""
        self._phase = name
        try:
            yield
        finally:
            self._phase = ""

    def _track(self, reftype: _RefType, t: torch.Tensor) -> None:
        super()._track(Category.TEACHER if self._phase == "teacher forward" else reftype, t)

    def _update_peak_stats(self, peak_state) -> None:
        before = sum(self._peak_mem.values())
        super()._update_peak_stats(peak_state)
        if sum(self._peak_mem.values()) > before:
            self.peak_phase = self._phase

    def categories(self, kind: str) -> dict[str, int]:
        """Bytes per plan category in the ``"peak"`` or ``"current"`` snapshot."""
        snapshot = next(iter(self.get_tracker_snapshot(kind).values()))
        return {name: sum(snapshot.get(Category(value), 0) for value in values) for name, values in CATEGORIES.items()}


# --- the plan: fake tensors, a fake process group ---------------------------------------------------------------------


def all_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[numel, dim]`` indices of every entry of ``mask``: its ``nonzero()`` when every entry is True."""
    grids = torch.meshgrid(*(torch.arange(size) for size in mask.shape), indexing="ij")
    return torch.stack(grids, -1).reshape(-1, mask.dim())


class MasksAllTrue(TorchDispatchMode):
    """Fake tensors hold no values, so ``x[mask]`` has no known size; here every boolean mask is all True (every
    response token real and distilled), and boolean indexing becomes indexing by every position."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:
            return all_positions(args[0])
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = []
            for index in args[1]:
                boolean = index is not None and index.dtype == torch.bool
                indices.extend(all_positions(index).unbind(1) if boolean else [index])
            return func(args[0], indices, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def fake_world(world_size: int) -> Iterator[DeviceMesh]:
    """A fake process group of ``world_size`` processes (this one is rank 0; collectives move nothing) and its 1-D CPU
    mesh; tensors made inside are fake (:class:`MasksAllTrue`). DTensor's sharding propagation gets a fake mode of its
    own: in ours, FSDPMemTracker would count its whole-tensor shapes (in AdamW and the EMA update) as allocations."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        with (FakeTensorMode(allow_non_fake_inputs=True), MasksAllTrue(),
              mock.patch.object(sharding_propagation, "detect_fake_mode", lambda *args: None)):
            yield mesh
    finally:
        dist.destroy_process_group()


def plan(workload: Workload) -> Plan:
    """The peak of one process in ``workload``'s training step, by category, from fake tensors."""
    start = time.perf_counter()
    config = qwen3(workload.architecture)
    with fake_world(workload.world_size) as mesh:
        policy, teacher = sharded_models(config, mesh)
        optimizer = adamw(policy)
        start_accumulating(policy, optimizer)
        batch = micro_batch(workload, config.vocab_size)
        tracker = StepTracker(policy, optimizer, teacher)
        tracker.track_inputs(batch.tensors())
        with tracker:
            training_step(policy, teacher, optimizer, batch, tracker.phase)
        return Plan(tracker.categories("peak"), tracker.peak_phase, tracker.categories("current"),
                    time.perf_counter() - start)


# --- calibration: the same step with real tensors over gloo -----------------------------------------------------------


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor's local shard)."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def live_state(policy, teacher, optimizer, batch: MicroBatch) -> int:
    """Bytes held before the step: both models' weights and buffers, the gradients, AdamW's state, the batch."""
    optimizer_state = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    gradients = [p.grad for p in policy.parameters() if p.grad is not None]
    return storage_bytes([*policy.parameters(), *policy.buffers(), *teacher.parameters(), *teacher.buffers(),
                          *gradients, *optimizer_state, *batch.tensors()])


def allocation_peaks(trace_path: str, thread: int) -> tuple[int, int]:
    """Highest running sums of the CPU allocator's allocations minus frees, from a profiler trace's ``[memory]``
    events (``profile_memory=True``): of every block, and of the blocks allocated by ``thread`` (wherever freed),
    which leaves out what the collective backend's own threads allocate (gloo's copies of a reduce-scatter's buffers;
    on a GPU, NCCL's buffers are no tensors either)."""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("name") == "[memory]"]
    everything = training = peak_everything = peak_training = 0
    foreign: set[int] = set()  # addresses of live blocks that another thread allocated
    for event in sorted(events, key=lambda e: e["ts"]):
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        everything += size
        if size > 0 and event["tid"] != thread:
            foreign.add(address)
        elif size < 0 and address in foreign:
            foreign.discard(address)
        else:
            training += size
        peak_everything, peak_training = max(peak_everything, everything), max(peak_training, training)
    return peak_everything, peak_training


def measure_worker(rank: int, workload: Workload, directory: str) -> None:
    """One gloo process of the measured step; rank 0 writes the peaks to ``directory``/measured.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(directory, "store"), workload.world_size),
                            rank=rank, world_size=workload.world_size)
    torch.manual_seed(0)
    config = qwen3(workload.architecture)
    policy, teacher = sharded_models(config, init_device_mesh("cpu", (workload.world_size,)))
    optimizer = adamw(policy)
    start_accumulating(policy, optimizer)
    batch = micro_batch(workload, config.vocab_size)
    state = live_state(policy, teacher, optimizer, batch)
    tracker = StepTracker(policy, optimizer, teacher)
    tracker.track_inputs(batch.tensors())
    trace = os.path.join(directory, f"trace{rank}.json")
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with profiler, tracker:
        training_step(policy, teacher, optimizer, batch, tracker.phase)
    profiler.export_chrome_trace(trace)
    if rank == 0:
        every_thread, training_thread = allocation_peaks(trace, threading.get_native_id())
        Path(directory, "measured.json").write_text(json.dumps({
            "tracker": sum(tracker.categories("peak").values()), "peak_phase": tracker.peak_phase,
            "allocator": state + training_thread, "allocator_every_thread": state + every_thread,
        }))
    dist.destroy_process_group()


def measure(workload: Workload) -> dict[str, int | str]:
    """The peak of the real step on ``workload.world_size`` CPU processes over gloo: by FSDPMemTracker, and by the
    allocator (the bytes alive before the step, counted from the tensors, plus the profiler's highest running sum:
    of the training thread's blocks, and of every block)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(measure_worker, args=(workload, directory), nprocs=workload.world_size)
        return json.loads(Path(directory, "measured.json").read_text())


# --- the colocated vLLM engine and the verdicts ----------------------------------------------------------------------


def parameter_count(config: Qwen3Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def kv_bytes_per_token(config: Qwen3Config) -> int:
    """Keys and values of every layer, bf16."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * BF16


@dataclass(frozen=True)
class Card:
    """One GPU (``name``) of ``capacity`` bytes shared by a trainer process and a colocated vLLM engine whose budget
    is ``utilization`` × ``capacity`` awake and ``asleep`` bytes asleep (what sleep mode keeps: CUDA graphs' pool, the
    engine's untagged allocations). ``reserve`` bytes on it are no tensor (CUDA context, NCCL, cuBLAS workspaces);
    the caching allocator holds a ``fragmentation`` share beyond the trainer's bytes."""

    name: str
    capacity: float
    utilization: float
    reserve: float
    fragmentation: float
    asleep: float

    @property
    def engine(self) -> float:
        return self.utilization * self.capacity

    def training(self, trainer_peak: float, sleep: bool) -> float:
        """Bytes in use at the trainer's peak, the engine asleep (sleep level 1 or 2) or awake."""
        return trainer_peak * (1 + self.fragmentation) + self.reserve + (self.asleep if sleep else self.engine)

    def generating(self, trainer_between: float) -> float:
        """Bytes in use while the engine generates beside the trainer's state between steps (its allocator's cache
        emptied)."""
        return trainer_between * (1 + self.fragmentation) + self.reserve + self.engine

    def evaluating(self, trainer_between: float, gathered: float) -> float:
        """Bytes in use during an evaluation: the engine awake and, beside the trainer's state between steps, the
        whole policy ``gathered`` on every process (the letter probe and the entropy run the policy itself)."""
        return self.generating(trainer_between) + gathered * (1 + self.fragmentation)

    def kv_cache(self, weights: float, overhead: float) -> float:
        """The engine's KV cache: its budget less its ``weights`` and its other memory (``overhead``: its profiling
        forward's activations, non-torch allocations)."""
        return self.engine - weights - overhead

    def need(self, trainer_peak: float, trainer_between: float, sleep: bool, gathered: float = 0.0) -> float:
        """Bytes in use at the busiest moment of a run: training, generating or (``gathered`` > 0: the bytes of the
        policy gathered whole) evaluating."""
        moments = [self.training(trainer_peak, sleep), self.generating(trainer_between)]
        return max(*moments, self.evaluating(trainer_between, gathered)) if gathered else max(moments)

    def verdict(self, trainer_peak: float, trainer_between: float, sleep: bool, weights: float, overhead: float,
                sequence: float, gathered: float = 0.0) -> str:
        """"fits" when every moment fits the card and the KV cache holds at least one ``sequence`` bytes long."""
        fits = self.need(trainer_peak, trainer_between, sleep, gathered) <= self.capacity
        return "fits" if fits and self.kv_cache(weights, overhead) >= sequence else "does not fit"

    def highest_utilization(self, trainer: float) -> float:
        """The largest utilisation (a multiple of 0.05) whose engine fits beside ``trainer`` bytes of the trainer's."""
        spare = self.capacity - trainer * (1 + self.fragmentation) - self.reserve
        return math.floor(spare / self.capacity * 20 + 1e-9) / 20


@dataclass(frozen=True)
class Engine:
    """The colocated engine of a preset: bf16 ``weights`` (tensor parallel 1), its ``overhead`` besides weights and
    KV cache, the KV bytes of one full-length ``sequence`` and how many rollouts a process generates per step."""

    weights: float
    overhead: float
    sequence: float
    rollouts: int

    def sequences(self, card: Card) -> int:
        """Full-length sequences the KV cache holds at once."""
        return max(int(card.kv_cache(self.weights, self.overhead) // self.sequence), 0)

    def utilization_for_all(self, capacity: float) -> float:
        """The smallest utilisation (a multiple of 0.05) whose KV cache holds every rollout of a step at once."""
        return math.ceil((self.weights + self.overhead + self.rollouts * self.sequence) / capacity * 20 - 1e-9) / 20


# --- printing ---------------------------------------------------------------------------------------------------------


def gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def print_trainer_table(plans: dict[int, tuple[Workload, Plan]]) -> None:
    names = list(CATEGORIES)
    print("| micro_batch_tokens | rows | " + " | ".join(names) + " | **peak** | peak in | between steps | plan s |")
    print("|---:|---:|" + "---:|" * (len(names) + 1) + "---|---:|---:|")
    for tokens, (workload, result) in plans.items():
        cells = " | ".join(gib(result.peak[name]) for name in names)
        print(f"| {tokens:,} | {workload.rows} | {cells} | **{gib(result.peak_bytes)}** | {result.peak_phase} | "
              f"{gib(result.between_steps_bytes)} | {result.seconds:.0f} |")


def print_card_table(plans: dict[int, tuple[Workload, Plan]], engine: Engine, cards: list[Card]) -> None:
    """Per card and utilisation: the engine's KV cache, then per micro-batch budget the GiB in use at the busiest
    moment and the verdict, with sleep mode and without."""
    print("| card | gpu_memory_utilization | KV cache | full-length sequences in KV / rollouts | "
          + " | ".join(f"{tokens:,} tokens: sleep level 2 / no sleep" for tokens in plans) + " |")
    print("|---|---:|---:|---:|" + "---|" * len(plans))
    for card in cards:
        cells = []
        for _, result in plans.values():
            cell = []
            for sleep in (True, False):
                need = card.need(result.peak_bytes, result.between_steps_bytes, sleep, engine.weights)
                answer = card.verdict(result.peak_bytes, result.between_steps_bytes, sleep, engine.weights,
                                      engine.overhead, engine.sequence, gathered=engine.weights)
                cell.append(f"{answer} ({gib(need)})")
            cells.append(" / ".join(cell))
        kv = max(card.kv_cache(engine.weights, engine.overhead), 0)
        print(f"| {card.name} | {card.utilization:.2f} | {gib(kv)} | {engine.sequences(card)} / {engine.rollouts} | "
              + " | ".join(cells) + " |")


def recommendation(plans: dict[int, tuple[Workload, Plan]], engine: Engine, card: Card, sleep: bool) -> str:
    """For ``card`` (its utilisation ignored), with sleep mode or without: the largest planned budget that fits at
    the highest utilisation it leaves room for (at most what holds every rollout of a process at once), provided the
    KV cache holds one sequence."""
    for tokens, (_, result) in sorted(plans.items(), reverse=True):
        evaluating = result.between_steps_bytes + engine.weights  # the policy gathered in bf16 (as the engine's)
        trainer = max(evaluating, result.between_steps_bytes if sleep else result.peak_bytes)
        utilization = min(card.highest_utilization(trainer), engine.utilization_for_all(card.capacity))
        chosen = replace(card, utilization=utilization)
        if chosen.verdict(result.peak_bytes, result.between_steps_bytes, sleep, engine.weights, engine.overhead,
                          engine.sequence, gathered=engine.weights) == "fits":
            return (f"memory.micro_batch_tokens={tokens:,}, rollout.gpu_memory_utilization={utilization:.2f} (KV for "
                    f"{engine.sequences(chosen)} of a process's {engine.rollouts} rollouts at once)")
    return "no planned micro-batch fits"


def preset_plans(preset: Preset, token_budgets: list[int], teacher_prompt: int) -> dict[int, tuple[Workload, Plan]]:
    """The plan of ``preset``'s step for each micro-batch budget: as many whole rows as the budget holds."""
    plans = {}
    for tokens in token_budgets:
        if tokens < preset.row_tokens:
            raise SystemExit(f"--micro-batch-tokens {tokens} is below one row ({preset.row_tokens} tokens)")
        workload = Workload(preset.architecture, preset.world_size, tokens // preset.row_tokens,
                            preset.prompt_tokens, preset.response_tokens, teacher_prompt)
        plans[tokens] = (workload, plan(workload))
    return plans


def run_preset(name: str, args: argparse.Namespace) -> None:
    """Plan preset ``name`` at every budget of ``args``, and print its tables and recommendations."""
    preset = PRESETS[name]
    config = qwen3(preset.architecture)
    teacher_prompt = args.teacher_prompt_tokens or preset.row_tokens
    plans = preset_plans(preset, args.micro_batch_tokens, teacher_prompt)
    engine = Engine(weights=parameter_count(config) * BF16, overhead=args.vllm_overhead_gib * GIB,
                    sequence=preset.row_tokens * kv_bytes_per_token(config), rollouts=preset.rollouts_per_process)
    margins = dict(reserve=args.reserve_gib * GIB, fragmentation=args.fragmentation, asleep=args.vllm_asleep_gib * GIB)
    print(f"\n## {name}: {preset.world_size} process(es), {parameter_count(config) / 1e9:.2f} B parameters, all "
          f"{config.num_hidden_layers} layers planned; rows of {preset.prompt_tokens:,} prompt + "
          f"{preset.response_tokens:,} response tokens; teacher prompt {teacher_prompt:,} tokens; "
          f"{preset.rollouts_per_process} rollouts per process per step (batch {preset.batch_size} × n {preset.n})\n")
    print("Trainer, per process, GiB (categories at the peak):\n")
    print_trainer_table(plans)
    print(f"\nWith vLLM on the same GPU (tensor parallel 1: weights {gib(engine.weights)} GiB in bf16, "
          f"{args.vllm_overhead_gib:g} GiB of other memory awake, {args.vllm_asleep_gib:g} asleep; "
          f"{gib(engine.sequence)} GiB of KV per {preset.row_tokens:,}-token sequence): GiB in use at the busiest "
          f"moment (training, generating or evaluating; reserve {args.reserve_gib:g} GiB, fragmentation "
          f"{args.fragmentation:.0%} of the trainer's bytes) and the verdict:\n")
    cards = [Card(card, capacity, utilization, **margins)
             for card, capacity in CARDS.items() for utilization in args.gpu_memory_utilization]
    print_card_table(plans, engine, cards)
    print("\nRecommended:")
    for card, capacity in CARDS.items():
        template = Card(card, capacity, 0.0, **margins)
        print(f"- {card}: rollout.sleep_level=2, {recommendation(plans, engine, template, sleep=True)}; without sleep "
              f"mode (sleep_level=0): {recommendation(plans, engine, template, sleep=False)}")


def calibrate(workloads: list[Workload]) -> None:
    """The plan's peak against the measured one, for each of ``workloads``."""
    print("\n## Calibration: the plan against the same step with real tensors on CPU processes over gloo\n")
    print("| workload | peak in (plan / real) | plan MiB | FSDPMemTracker, real | allocator, training thread | "
          "allocator, every thread | plan / tracker | **plan / allocator** |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for workload in workloads:
        planned = plan(workload)
        measured = measure(workload)
        peak, tracked, allocated = planned.peak_bytes, measured["tracker"], measured["allocator"]
        processes = f"{workload.world_size} process" + ("es" if workload.world_size > 1 else "")
        print(f"| {workload.architecture}, {processes}, {workload.rows} × "
              f"({workload.prompt_tokens} + {workload.response_tokens}) tokens, teacher prompt "
              f"{workload.teacher_prompt_tokens} | {planned.peak_phase} / {measured['peak_phase']} | "
              f"{peak / MIB:,.2f} | {tracked / MIB:,.2f} | {allocated / MIB:,.2f} | "
              f"{measured['allocator_every_thread'] / MIB:,.2f} | {peak / tracked:.4f} | **{peak / allocated:.4f}** |")
    print("\nWith 2 processes the allocator may count more than the plan: a collective's buffer (one unit's gathered "
          "weights or reduce-scatter input) that gloo frees when its threads get to it, after FSDP has let go of it; "
          "every thread: with the blocks gloo's threads allocate themselves (NCCL's buffers are no tensors).")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), nargs="+", default=list(PRESETS))
    parser.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[10_240, 20_480, 40_960, 81_920],
                        help="padded prompt + response tokens per forward/backward on each process")
    parser.add_argument("--gpu-memory-utilization", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--teacher-prompt-tokens", type=int, default=None,
                        help="the teacher's prompt per row (default: prompt + response, a full-length demonstration)")
    parser.add_argument("--reserve-gib", type=float, default=2.0,
                        help="memory per GPU that is no tensor: CUDA context, NCCL, cuBLAS workspaces")
    parser.add_argument("--fragmentation", type=float, default=0.10,
                        help="share of the trainer's bytes the caching allocator holds beyond them")
    parser.add_argument("--vllm-overhead-gib", type=float, default=2.0,
                        help="vLLM's memory awake besides weights and KV cache (its profiling forward's activations, "
                             "CUDA graphs, non-torch allocations): an estimate")
    parser.add_argument("--vllm-asleep-gib", type=float, default=1.0,
                        help="what vLLM keeps asleep (CUDA graphs' pool, allocations sleep mode does not free): "
                             "an estimate")
    parser.add_argument("--calibrate", action="store_true",
                        help="instead: the plan against measured steps of small architectures on 1 and 2 CPU "
                             "processes, with the peak in the loss, in backward and in the teacher's forward")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(f"# memory plan: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; fake tensors "
          "on a CPU, nothing here ran on a GPU")
    if args.calibrate:
        calibrate([Workload("small", 2, rows=2, prompt_tokens=256, response_tokens=1024, teacher_prompt_tokens=512),
                   Workload("small-vocab", 2, rows=4, prompt_tokens=256, response_tokens=1792,
                            teacher_prompt_tokens=256),
                   Workload("small-vocab", 1, rows=4, prompt_tokens=256, response_tokens=1792,
                            teacher_prompt_tokens=256),
                   Workload("small-vocab", 2, rows=1, prompt_tokens=256, response_tokens=768,
                            teacher_prompt_tokens=3072),
                   Workload("tiny", 2, rows=2, prompt_tokens=64, response_tokens=512, teacher_prompt_tokens=64)])
        return
    for name in args.preset:
        run_preset(name, args)


if __name__ == "__main__":
    main()
