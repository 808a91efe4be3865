"""The colocated vLLM engine's life cycle without a GPU: what it asks of ``vllm.LLM`` and in which order.

Sleep mode exists only on CUDA, so these tests hand :class:`VLLMEngine` a stand-in for ``vllm.LLM`` made by
``unittest.mock.create_autospec`` from the installed vLLM: a call whose arguments do not fit that vLLM's signatures
fails, and every keyword given to ``vllm.LLM(...)`` must be one of its ``EngineArgs`` fields. The weights handed to
``collective_rpc("reload_weights")`` are read as vLLM would read them.
"""

import dataclasses
import random
from types import SimpleNamespace
from unittest.mock import create_autospec

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from demopsd.config.settings import EngineConfig, SamplingConfig, ShardingConfig
from demopsd.rollout.batch import PromptBatch
from demopsd.rollout.vllm import VLLMEngine, engine_arguments, import_vllm, sleep_level
from demopsd.runtime.sharding import full_state, shard_model
from tests.helpers import tiny_llama

vllm = import_vllm()
ENGINE_ARGS = {field.name for field in dataclasses.fields(vllm.EngineArgs)}
SAMPLING = SamplingConfig(n=2, max_new_tokens=4)
PROMPTS = PromptBatch(ids=torch.tensor([[0, 5, 6], [7, 8, 9]]), mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
RESPONSE = [11, 12]


class Tokenizer:
    """Stands in for a tokenizer: what the engine reads of one (pad and EOS ids, decoding)."""

    pad_token_id, eos_token_id = 0, 2

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(i) for i in row.tolist() if i != self.pad_token_id) for row in ids]


class FakeVLLM:
    """``vllm.LLM`` as an autospec mock: records the keywords it was built with and the weights each push
    carried (``(name, tensor)`` lists, read from the generator as vLLM reads it), and answers every request with
    ``n`` copies of :data:`RESPONSE`."""

    def __init__(self, monkeypatch, on_build=None) -> None:
        self.llm = create_autospec(vllm.LLM, instance=True)
        self.llm.collective_rpc.side_effect = self.reload
        self.llm.generate.side_effect = self.generate
        self.built: list[dict] = []
        self.pushes: list[list[tuple[str, torch.Tensor]]] = []
        self.on_build = on_build
        monkeypatch.setattr(vllm, "LLM", self.build)
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine sets it; put back afterwards

    def build(self, **kwargs):
        self.built.append(kwargs)
        if self.on_build:
            self.on_build()
        return self.llm

    def reload(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self.pushes.append([(name, tensor.clone()) for name, tensor in kwargs["weights_iterator"]])  # vLLM copies

    def generate(self, requests, params, use_tqdm=True):
        token = SimpleNamespace(logprob=-0.5)
        completion = SimpleNamespace(token_ids=RESPONSE, logprobs=[{t: token} for t in RESPONSE])
        params = params if isinstance(params, list) else [params] * len(requests)  # one for all, or one each
        return [SimpleNamespace(outputs=[completion] * p.n) for p in params]

    def calls(self) -> list[str]:
        """The engine's calls so far, as ``name(arguments)`` (a push as ``push``, a generation as ``generate``),
        then forgotten."""
        names = []
        for name, args, kwargs in self.llm.mock_calls:
            if name == "collective_rpc":
                names.append("push")
            elif name == "generate":
                names.append("generate")
            else:
                names.append(f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})")
        self.llm.reset_mock()
        return names


def build(fake: FakeVLLM, policy, **settings) -> VLLMEngine:
    return VLLMEngine(policy, Tokenizer(), EngineConfig(**settings), max_model_len=64, seed=0)


WAKE = ["wake_up(tags=['weights'])", "push", "wake_up(tags=['kv_cache'])", "reset_prefix_cache()"]


def test_the_null_settings_resolve_by_machine():
    cpu = engine_arguments(EngineConfig(), torch.float32, cuda=False)
    cuda = engine_arguments(EngineConfig(), torch.float32, cuda=True)
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["enable_sleep_mode"]) == ("float32", True, False)
    assert (cuda["dtype"], cuda["enforce_eager"], cuda["enable_sleep_mode"]) == ("bfloat16", False, True)
    assert (sleep_level(EngineConfig(), cuda=False), sleep_level(EngineConfig(), cuda=True)) == (0, 2)
    chosen = EngineConfig(dtype="float16", sleep_level=0, enforce_eager=True)
    assert engine_arguments(chosen, torch.float32, cuda=True) == {
        "dtype": "float16", "enforce_eager": True, "enable_sleep_mode": False, "gpu_memory_utilization": 0.3,
        "kv_cache_memory_bytes": None, "tensor_parallel_size": 1,
    }
    assert sleep_level(EngineConfig(sleep_level=1), cuda=True) == 1
    assert engine_arguments(EngineConfig(), torch.bfloat16, cuda=False)["dtype"] == "bfloat16"  # the policy's


@pytest.mark.parametrize("settings", [{}, {"sleep_level": 2, "dtype": "bfloat16", "enforce_eager": False}])
def test_every_keyword_given_to_vllm_is_one_of_its_engine_arguments(monkeypatch, settings):
    fake = FakeVLLM(monkeypatch)
    build(fake, tiny_llama(), **settings)
    (kwargs,) = fake.built
    assert set(kwargs) <= ENGINE_ARGS, set(kwargs) - ENGINE_ARGS
    assert kwargs["enable_sleep_mode"] == bool(settings)
    assert kwargs["dtype"] == settings.get("dtype", "float32")


@pytest.mark.parametrize("level", [1, 2])
def test_the_engine_sleeps_after_each_training_generation_and_wakes_with_the_weights_first(monkeypatch, level):
    fake = FakeVLLM(monkeypatch)
    policy = tiny_llama().train()
    engine = build(fake, policy, sleep_level=level, dtype="bfloat16")
    assert fake.calls() == [f"sleep(level={level})"]  # built asleep: the trainer sets up in the freed memory

    rollouts = engine.generate(PROMPTS, SAMPLING)
    assert fake.calls() == [*WAKE, "generate", f"sleep(level={level})"]  # the checkpoint's weights are replaced
    assert rollouts.response_ids.tolist() == [RESPONSE] * 4 and rollouts.log_probs.eq(-0.5).all()

    engine.policy_updated()
    engine.generate(PROMPTS, SAMPLING)
    assert fake.calls() == [*WAKE, "generate", f"sleep(level={level})"]

    engine.generate(PROMPTS, SAMPLING)  # the policy did not change: level 1 kept the weights, level 2 did not
    wake = WAKE if level == 2 else [WAKE[0], *WAKE[2:]]
    assert fake.calls() == [*wake, "generate", f"sleep(level={level})"]
    assert len(fake.pushes) == (3 if level == 2 else 2)


def test_each_push_carries_the_policys_weights_in_the_engines_dtype(monkeypatch):
    fake = FakeVLLM(monkeypatch)
    policy = tiny_llama().train()
    engine = build(fake, policy, sleep_level=2, dtype="bfloat16")
    engine.generate(PROMPTS, SAMPLING)
    (push,) = fake.pushes
    state = policy.state_dict()
    assert [name for name, _ in push] == list(state)
    for name, tensor in push:
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


def test_evaluation_generations_keep_the_engine_awake_and_need_no_push(monkeypatch):
    """Evaluation syncs every process, then each generates alone with the policy in eval mode: a sleep there
    would make the next generation push the weights, a collective the other processes never join."""
    fake = FakeVLLM(monkeypatch)
    policy = tiny_llama().train()
    engine = build(fake, policy, sleep_level=2, dtype="bfloat16")
    engine.generate(PROMPTS, SAMPLING)
    engine.policy_updated()
    fake.calls()

    policy.eval()
    engine.sync()
    assert fake.calls() == WAKE
    engine.generate(PROMPTS, SAMPLING)
    engine.generate(PROMPTS, SAMPLING, greedy=True)
    assert fake.calls() == ["generate", "generate"]

    policy.train()  # training again: the next generation is the training step's, and the engine sleeps after it
    engine.generate(PROMPTS, SAMPLING)
    assert fake.calls() == ["generate", "sleep(level=2)"]


def test_without_sleep_mode_the_engine_stays_resident_and_pushes_only_changed_weights(monkeypatch):
    fake = FakeVLLM(monkeypatch)
    engine = build(fake, tiny_llama().train(), sleep_level=0)
    assert fake.calls() == []
    engine.generate(PROMPTS, SAMPLING)
    engine.generate(PROMPTS, SAMPLING)
    assert fake.calls() == ["push", "reset_prefix_cache()", "generate", "generate"]
    engine.policy_updated()
    engine.generate(PROMPTS, SAMPLING)
    assert fake.calls() == ["push", "reset_prefix_cache()", "generate"]
    assert all(tensor.dtype == torch.float32 for _, tensor in fake.pushes[-1])  # the policy's dtype on a CPU


def reseed_like_vllm() -> None:
    """What building a vLLM engine does to the process's random states (its worker's ``set_random_seed``)."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(0)


def test_building_the_engine_leaves_the_global_random_states_as_they_were(monkeypatch):
    fake, policy = FakeVLLM(monkeypatch, on_build=reseed_like_vllm), tiny_llama()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    torch.rand(1), np.random.rand(), random.random()  # states that no seed gives directly
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    build(fake, policy)
    assert fake.built  # the reseeding ran
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]


@pytest.fixture
def mesh(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_sharded_policys_weights_are_cast_before_they_are_gathered_one_at_a_time(monkeypatch, mesh):
    plain, sharded = tiny_llama(), tiny_llama()
    shard_model(sharded, mesh, ShardingConfig(param_dtype="float32", activation_checkpointing=False))
    gathered_dtypes = []
    full_tensor = DTensor.full_tensor

    def recording_full_tensor(self, *args, **kwargs):
        gathered_dtypes.append(self.dtype)
        return full_tensor(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "full_tensor", recording_full_tensor)
    weights = full_state(sharded, torch.bfloat16)
    name, first = next(weights)
    assert gathered_dtypes == [torch.bfloat16]  # a generator: one tensor gathered so far, cast before the gather
    rest = dict(weights)
    assert gathered_dtypes == [torch.bfloat16] * (1 + len(rest))
    expected = plain.state_dict()
    assert [name, *rest] == list(expected)
    for key, tensor in {name: first, **rest}.items():
        assert not isinstance(tensor, DTensor) and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key


def test_in_a_process_group_the_engine_joins_it_through_the_external_launcher(monkeypatch, mesh):
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)  # the engine sets them for vLLM; put back afterwards
    fake = FakeVLLM(monkeypatch)
    build(fake, tiny_llama())
    (kwargs,) = fake.built
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert set(kwargs) <= ENGINE_ARGS


def test_loading_another_models_weights_wakes_a_sleeping_engine_first(monkeypatch):
    fake, other = FakeVLLM(monkeypatch), tiny_llama(seed=1)
    engine = build(fake, tiny_llama().train(), sleep_level=2, dtype="bfloat16")
    fake.calls()
    engine.load_weights(other)
    assert fake.calls() == [*WAKE, "push", "reset_prefix_cache()"]
    assert torch.equal(dict(fake.pushes[-1])["lm_head.weight"], other.lm_head.weight.to(torch.bfloat16))
