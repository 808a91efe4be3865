"""Loading for trainer=fsdp: only the process of global rank 0 reads the weights, every other builds the model on
the meta device, and SelfDistillationModule.configure_model fills every process's shards of the policy from rank
0's and those of the EMA teacher (built empty) from the policy's. Checked in one process (a one-process gloo
group) and in two (a gloo group over a file store, started with torch.multiprocessing as Lightning's launcher
would start them: the second with LOCAL_RANK=1): each process's shards, buffers and forward are those of the
model loaded the ordinary way, and each process holds one copy of the weights, not two."""

import gc
import itertools
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from demopsd.config.objectives import DistillationConfig
from demopsd.config.settings import RepromptConfig, SamplingConfig, ShardingConfig
from demopsd.runtime.attention import GROUPED_SDPA
from demopsd.runtime.models import RANK_VARIABLES, awaits_rank0_weights, is_global_rank_zero, load_model_and_tokenizer
from demopsd.runtime.sharding import full_state, reshard, shard_from_rank0, shard_model, shards_the_model
from demopsd.training.module import SelfDistillationModule
from demopsd.training.steps import DistillationStep
from demopsd.training.teacher import fill_ema_teacher, make_ema_teacher
from tests.helpers import CONFIG_DIR, global_random_states, spawn_processes, tiny_llama

FP32 = ShardingConfig(param_dtype="float32", reduce_dtype="float32", activation_checkpointing=False)
IDS = torch.tensor([[0, 0, 5, 9, 13, 20], [3, 17, 4, 8, 1, 30]])  # the first row left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


@pytest.fixture(autouse=True)
def started_alone(monkeypatch):
    """No launcher's rank in the environment, as for a process the user started."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def save_tiny_model(directory: Path, generation_file: bool = True) -> Path:
    """tiny_llama with a 64-word tokenizer and a generation config of its own (sampling, ``top_k=7``) in
    ``directory``; without its ``generation_config.json`` if not ``generation_file``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    model = tiny_llama()
    model.generation_config.do_sample, model.generation_config.top_k = True, 7
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w1", eos_token="w2", unk_token="w0").save_pretrained(
        directory
    )
    if not generation_file:
        (directory / "generation_config.json").unlink()
    return directory


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS, attention_mask=MASK).logits
    reshard(model)
    return out


# ------------------------------------------------------------------ one process


def test_the_launcher_environment_says_which_process_reads_the_weights(monkeypatch):
    assert is_global_rank_zero()
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "0")
    assert is_global_rank_zero()  # torchrun's first process: RANK=0, LOCAL_RANK=0, GROUP_RANK=0
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "1")
        assert not is_global_rank_zero(), name
        monkeypatch.setenv(name, "0")


@pytest.mark.parametrize("generation_file", [True, False], ids=["generation_config.json", "from config.json"])
def test_processes_after_the_first_build_the_same_model_on_the_meta_device(tmp_path, monkeypatch, generation_file):
    directory = save_tiny_model(tmp_path, generation_file)
    plain, plain_tokenizer = load_model_and_tokenizer(str(directory))
    first, _ = load_model_and_tokenizer(str(directory), sharded=True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # how Lightning's launcher starts the second process of a node
    other, tokenizer = load_model_and_tokenizer(str(directory), sharded=True)

    assert not awaits_rank0_weights(plain) and awaits_rank0_weights(first) and awaits_rank0_weights(other)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
    assert all(t.is_meta for t in itertools.chain(other.parameters(), other.buffers()))
    assert not any(t.is_meta for t in itertools.chain(first.parameters(), first.buffers()))
    assert other.config.to_dict() == plain.config.to_dict()
    assert other.generation_config.to_dict() == plain.generation_config.to_dict()
    assert (plain.generation_config.top_k == 7) is generation_file  # the file is read where there is one
    assert other.name_or_path == plain.name_or_path and other.dtype == plain.dtype
    assert other.config._attn_implementation == plain.config._attn_implementation == GROUPED_SDPA
    assert not other.training and not plain.training
    assert other.lm_head.weight is other.model.embed_tokens.weight
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.padding_side) == (plain_tokenizer.pad_token, "left")


def test_the_sharded_load_follows_the_trainer_strategy():
    def trainer(name):
        return OmegaConf.load(CONFIG_DIR / "trainer" / f"{name}.yaml")

    assert shards_the_model(trainer("fsdp"))
    assert not shards_the_model(trainer("ddp")) and not shards_the_model(trainer("default"))
    assert not shards_the_model(OmegaConf.create({"strategy": "ddp"}))


@pytest.mark.parametrize("trainer, sharded", [("fsdp", True), ("ddp", False), ("default", False)])
def test_a_run_loads_the_policy_on_rank_zero_only_under_trainer_fsdp(tmp_path, monkeypatch, trainer, sharded):
    import demopsd.training.run
    from demopsd.config.check import validate_config
    from tests.fixed_step import train_config

    class Loaded(Exception):
        """Stops the run where the policy is loaded."""

    def load(*args, **kwargs):
        raise Loaded(kwargs)

    monkeypatch.setattr(demopsd.training.run, "load_model_and_tokenizer", load)
    with pytest.raises(Loaded) as loaded:
        demopsd.training.run.run(
            validate_config(train_config("demopsd", f"trainer={trainer}", f"paths.output_dir={tmp_path}")))
    assert loaded.value.args[0]["sharded"] is sharded


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_shards_and_the_empty_teacher_are_filled_with_the_loaded_weights(mesh, tmp_path):
    directory = save_tiny_model(tmp_path)
    plain, _ = load_model_and_tokenizer(str(directory))
    policy, _ = load_model_and_tokenizer(str(directory), sharded=True)
    policy.train()
    teacher = make_ema_teacher(policy)
    assert all(t.is_meta for t in itertools.chain(teacher.parameters(), teacher.buffers()))
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight

    shard_from_rank0(policy, mesh, FP32)
    shard_model(teacher, mesh, FP32)
    fill_ema_teacher(teacher, policy)

    assert not awaits_rank0_weights(policy)
    for model in (policy, teacher):
        assert all(isinstance(p, DTensor) for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still one weight, as shard_model keeps it
        assert dict(full_state(model)).keys() == plain.state_dict().keys()
        for name, tensor in full_state(model):
            assert torch.equal(tensor, plain.state_dict()[name]), name
        for (name, buffer), (_, expected) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
            assert torch.equal(buffer, expected), name  # rotary inv_freq: not in the state dict
        torch.testing.assert_close(logits(model), logits(plain), rtol=0, atol=0)
    assert all(p.requires_grad for p in policy.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    assert policy.training and not teacher.training
    with torch.no_grad():
        policy.model.norm.weight.add_(1.0)
    assert not torch.equal(policy.model.norm.weight.full_tensor(), teacher.model.norm.weight.full_tensor())


def test_a_model_loaded_whole_on_every_process_is_sharded_with_shard_model(mesh):
    with pytest.raises(ValueError, match="LlamaForCausalLM was not loaded with sharded=True: shard it with shard_"):
        shard_from_rank0(tiny_llama(), mesh, FP32)


def test_a_first_process_without_weights_is_a_clear_error(mesh, tmp_path, monkeypatch):
    directory = save_tiny_model(tmp_path)
    monkeypatch.setenv("RANK", "1")  # a launcher environment that names another rank than the process has
    policy, _ = load_model_and_tokenizer(str(directory), sharded=True)
    with pytest.raises(RuntimeError, match=r"global rank 0 holds no weights to shard: .* named another rank"):
        shard_from_rank0(policy, mesh, FP32)


def test_a_policy_awaiting_rank0_weights_needs_a_sharding_strategy(tmp_path):
    policy, tokenizer = load_model_and_tokenizer(str(save_tiny_model(tmp_path)), sharded=True)
    step = DistillationStep(policy, tokenizer, DistillationConfig(), SamplingConfig(), RepromptConfig())
    module = SelfDistillationModule(policy, tokenizer, step, SamplingConfig())
    with pytest.raises(RuntimeError, match="loaded with sharded=True .* but the strategy shards nothing"):
        module.configure_model()


# ------------------------------------------------------------------ two processes

WORLD = 2


def memory(name: str) -> int:
    """``VmRSS`` or ``VmHWM`` (its peak) of this process, in bytes."""
    return int(re.search(rf"{name}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak_memory() -> None:
    """Make ``VmHWM`` the current ``VmRSS`` (Linux). Where the kernel refuses, the peak keeps what came before,
    which can only make a measured peak larger."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def configured_module(directory: Path) -> SelfDistillationModule:
    """The module of a DemoPSD run over the model in ``directory``, as ``trainer=fsdp`` builds it, before
    ``configure_model``."""
    policy, tokenizer = load_model_and_tokenizer(str(directory), sharded=True)
    step = DistillationStep(policy, tokenizer, DistillationConfig(), SamplingConfig(), RepromptConfig())
    return SelfDistillationModule(policy, tokenizer, step, SamplingConfig(), sharding=FP32)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def set_up_in_process(rank: int, out: Path, tiny_dir: Path, big_dir: Path) -> None:
    """One process's part: the setup of a run over the model of ``big_dir`` with its host memory measured, then
    over the tiny model with its shards, buffers and forward written to ``out/rank<r>.pt``."""
    if rank > 0:
        os.environ["LOCAL_RANK"] = str(rank)  # as Lightning's launcher starts the processes after the first
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(str(out / "store"), WORLD), rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
        gc.collect()
        reset_peak_memory()
        before = memory("VmRSS")
        module = configured_module(big_dir)
        module._device_mesh = mesh  # what Lightning's ModelParallelStrategy hands the module
        module.configure_model()
        gc.collect()
        measured = {
            "peak": memory("VmHWM") - before, "after": memory("VmRSS") - before,
            "policy": sum(local(p).nbytes for p in module.policy.parameters()),
            "teacher": sum(local(p).nbytes for p in module.teacher.parameters()),
        }
        del module
        gc.collect()

        module = configured_module(tiny_dir)
        empty = {name: all(p.is_meta for p in model.parameters())
                 for name, model in (("policy", module.policy), ("teacher", module.teacher))}
        module._device_mesh = mesh
        module.configure_model()
        policy, teacher = module.policy, module.teacher
        torch.save({
            "memory": measured, "empty_before": empty,
            "shards": {name: {n: local(p).clone() for n, p in model.named_parameters()}
                       for name, model in (("policy", policy), ("teacher", teacher))},
            "buffers": {name: {n: b.clone() for n, b in model.named_buffers()}
                        for name, model in (("policy", policy), ("teacher", teacher))},
            "logits": {"policy": logits(policy), "teacher": logits(teacher)},
            "requires_grad": {"policy": [p.requires_grad for p in policy.parameters()],
                              "teacher": [p.requires_grad for p in teacher.parameters()]},
            "teacher_training": teacher.training,
            "tied": [m.lm_head.weight is m.model.embed_tokens.weight for m in (policy, teacher)],
        }, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir):
    """Each process's record, and the size of the large model in bytes. The large model (about 450 MB of float32,
    random) makes the weights dominate a process's memory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out, big_dir = tmp_path_factory.mktemp("two-processes"), tmp_path_factory.mktemp("large-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
    )
    with global_random_states():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model_bytes = sum(p.nbytes for p in model.parameters())
    model.save_pretrained(big_dir)
    tokenizer.save_pretrained(big_dir)
    del model
    spawn_processes(set_up_in_process, (out, tiny_model_dir, big_dir), WORLD, out)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)], model_bytes


@pytest.mark.slow
def test_each_process_holds_the_shards_of_the_ordinary_model(two_processes, tiny_model_dir):
    records, _ = two_processes
    plain, _ = load_model_and_tokenizer(str(tiny_model_dir))
    expected_logits = logits(plain)
    for rank, record in enumerate(records):
        # only the first process read the weights; both teachers were built without any
        assert record["empty_before"] == {"policy": rank > 0, "teacher": True}
        for name in ("policy", "teacher"):
            shards = record["shards"][name]
            assert shards.keys() == dict(plain.named_parameters()).keys()
            for key, shard in shards.items():
                full = plain.get_parameter(key).detach()
                assert shard.shape[0] < full.shape[0], key  # a shard, not the whole tensor
                assert torch.equal(shard, full.chunk(WORLD)[rank]), (rank, name, key)
            for key, buffer in plain.named_buffers():
                assert torch.equal(record["buffers"][name][key], buffer), (rank, name, key)
            torch.testing.assert_close(record["logits"][name], expected_logits, rtol=0, atol=0)
        assert all(record["requires_grad"]["policy"]) and not any(record["requires_grad"]["teacher"])
        assert not record["teacher_training"] and record["tied"] == [True, True]


@pytest.mark.slow
def test_each_process_holds_one_copy_of_the_weights_not_two(two_processes):
    records, model_bytes = two_processes
    shards = 2 * model_bytes / WORLD  # its shards of the policy and of the teacher
    margin = 0.35 * model_bytes  # the tokenizer, the config and one whole tensor in flight, and allocator slack
    for rank, record in enumerate(records):
        measured = record["memory"]
        for name in ("policy", "teacher"):
            assert measured[name] == pytest.approx(model_bytes / WORLD, rel=0.01), (rank, name)
        # loading whole and copying the teacher, as every process did before, peaks above two whole copies
        whole_weights = model_bytes if rank == 0 else 0
        assert measured["peak"] < whole_weights + shards + margin, (rank, measured, model_bytes)
        assert measured["after"] < shards + margin, (rank, measured, model_bytes)  # rank 0 let go of its copy
