"""FSDP2 pieces in one process (a one-process gloo group): sharding by decoder layer, gathering for generation,
gathered weights for saving and vLLM, the EMA update and the gradient guard on sharded tensors, and sharded
checkpoints as resume points. tests/test_fsdp.py runs two processes end to end."""

import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from demopsd.config.settings import ShardingConfig
from demopsd.objectives import chunked_token_log_probs
from demopsd.rollout.batch import PromptBatch
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.runtime.checkpoints import is_checkpoint, newest_checkpoint
from demopsd.runtime.resume import read_run_state, resolve_checkpoint
from demopsd.runtime.sharding import fsdp_units, full_state, gathered, reshard, save_pretrained, shard_model
from demopsd.training.guards import nonfinite_gradients
from demopsd.training.teacher import ema_update, make_ema_teacher
from tests.helpers import tiny_llama

FP32 = ShardingConfig(param_dtype="float32", reduce_dtype="float32", activation_checkpointing=False)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sharded_tiny(mesh, config=FP32):
    model = tiny_llama()
    shard_model(model, mesh, config)
    return model


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def test_each_decoder_layer_is_a_unit_under_the_root(mesh):
    model = sharded_tiny(mesh)
    units = fsdp_units(model)
    assert units[0] is model and units[1:] == list(model.model.layers)
    assert all(is_sharded(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay one sharded tensor


def test_a_model_without_a_decoder_layer_class_is_refused(mesh):
    model = tiny_llama()
    model._no_split_modules = []
    with pytest.raises(ValueError, match="LlamaForCausalLM names no decoder-layer class"):
        shard_model(model, mesh, FP32)


def test_activation_checkpointing_applies_to_trained_models_only(mesh):
    policy = sharded_tiny(mesh, ShardingConfig(param_dtype="float32"))
    teacher = make_ema_teacher(tiny_llama())
    shard_model(teacher, mesh, ShardingConfig(param_dtype="float32"))
    assert policy.model.gradient_checkpointing and not teacher.model.gradient_checkpointing


def test_gathered_weights_are_whole_inside_and_sharded_after(mesh):
    plain, model = tiny_llama(), sharded_tiny(mesh)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad(), gathered(model):
        assert not any(is_sharded(p) for p in model.parameters())
        inside = model(ids).logits
        assert not any(is_sharded(p) for p in model.model.layers[0].parameters())  # kept whole between forwards
    assert all(is_sharded(p) for p in model.parameters())
    torch.testing.assert_close(inside, plain(ids).logits)
    with torch.no_grad():
        model(ids)
    # as sharding left them: layers freed after their forward, the root kept whole until backward or reshard
    assert all(is_sharded(p) for p in model.model.layers.parameters())
    assert not is_sharded(lm_head_weight(model))
    reshard(model)
    assert is_sharded(lm_head_weight(model))


def test_hidden_states_and_head_of_a_sharded_model_match_the_plain_one(mesh):
    plain, model = tiny_llama(), sharded_tiny(mesh)
    prompt = PromptBatch(torch.tensor([[0, 11, 12], [21, 22, 23]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    response, mask = torch.tensor([[31, 32], [41, 42]]), torch.tensor([[1, 1], [1, 0]])

    def log_probs(m):
        return torch.log_softmax(response_hidden_states(m, prompt, response, mask) @ lm_head_weight(m).T, -1)

    expected, actual = log_probs(plain), log_probs(model)
    torch.testing.assert_close(actual, expected)
    actual.logsumexp(-1).sum().backward()  # gradients reach the sharded weights through the gathered head
    expected.logsumexp(-1).sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad)
    torch.testing.assert_close(
        model.model.layers[1].mlp.up_proj.weight.grad.full_tensor(), plain.model.layers[1].mlp.up_proj.weight.grad
    )


def test_grpo_log_probs_recomputed_in_backward_reach_the_sharded_head(mesh):
    """chunked_token_log_probs recomputes each chunk's logits in backward: the root must still be gathered then."""
    plain, model = tiny_llama(), sharded_tiny(mesh)
    prompt = PromptBatch(torch.tensor([[11, 12, 13]]), torch.tensor([[1, 1, 1]]))
    response, mask = torch.tensor([[31, 32, 33, 34]]), torch.tensor([[1, 1, 1, 1]])
    for m in (plain, model):
        hidden = response_hidden_states(m, prompt, response, mask)[0]
        log_probs, _ = chunked_token_log_probs(hidden, lm_head_weight(m), response[0], chunk_size=3)
        (log_probs * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad)
    torch.testing.assert_close(model.model.norm.weight.grad.full_tensor(), plain.model.norm.weight.grad)


def test_full_state_and_save_pretrained_give_plain_whole_weights(mesh, tmp_path):
    from transformers import AutoModelForCausalLM

    plain, model = tiny_llama(), sharded_tiny(mesh)
    state = dict(full_state(model))
    assert state.keys() == plain.state_dict().keys()
    assert all(type(t) is torch.Tensor and torch.equal(t, plain.state_dict()[k]) for k, t in state.items())

    tokenizer = SimpleNamespace(save_pretrained=lambda directory: None)
    save_pretrained(model, tokenizer, tmp_path / "model", is_global_zero=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, plain.state_dict()[name], rtol=0, atol=0)


def test_ema_update_of_sharded_weights_is_the_convex_combination(mesh):
    student, teacher_weights = tiny_llama(seed=0), tiny_llama(seed=1)
    teacher = make_ema_teacher(teacher_weights)
    expected = {k: 0.9 * v + 0.1 * student.state_dict()[k] for k, v in teacher.state_dict().items()}
    shard_model(student, mesh, FP32)
    shard_model(teacher, mesh, FP32)
    ema_update(teacher, student, 0.1)
    for name, tensor in full_state(teacher):
        torch.testing.assert_close(tensor, expected[name])


def test_a_nonfinite_sharded_gradient_is_named(mesh):
    model = sharded_tiny(mesh)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bad = model.model.layers[1].self_attn.v_proj.weight
    bad.grad = bad.grad.to_local().index_fill(0, torch.tensor([0]), float("nan"))
    bad.grad = DTensor.from_local(bad.grad, bad.device_mesh, bad.placements)
    assert nonfinite_gradients(model, list(model.parameters())) == ["model.layers.1.self_attn.v_proj.weight"]


@pytest.mark.parametrize("key, value", [("param_dtype", "fp8"), ("reduce_dtype", "half")])
def test_bad_sharding_dtypes_name_the_key_and_the_choices(key, value):
    with pytest.raises(ValueError, match=rf"fsdp.{key}='{value}' is invalid: one of float32, bfloat16, float16"):
        ShardingConfig(**{key: value})


def sharded_checkpoint(directory, step, age_s=0.0, complete=True):
    """A directory laid out like Lightning's sharded checkpoint: shards, then the trainer state last."""
    directory.mkdir(parents=True)
    (directory / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        torch.save({"callbacks": {"RunStateCheckpoint": {"global_step": step}}}, directory / "meta.pt")
        stamp = time.time() - age_s
        os.utime(directory / "meta.pt", (stamp, stamp))
    return directory


def test_sharded_checkpoints_resume_from_the_newest_complete_one(tmp_path):
    run_dir = tmp_path / "2026-01-01_00-00-00_x"
    older = sharded_checkpoint(run_dir / "checkpoints" / "step000002.ckpt", 2, age_s=20)
    newest = sharded_checkpoint(run_dir / "checkpoints" / "step000004.ckpt", 4, age_s=10)
    cut_short = sharded_checkpoint(run_dir / "checkpoints" / "step000006.ckpt", 6, complete=False)

    assert is_checkpoint(older) and not is_checkpoint(cut_short)
    assert newest_checkpoint(run_dir) == newest.resolve()
    assert resolve_checkpoint(run_dir, tmp_path, "x").checkpoint == newest.resolve()
    point = resolve_checkpoint(older, tmp_path, "x")
    assert point.checkpoint == older.resolve() and point.run_dir == run_dir.resolve()
    assert read_run_state(older) == {"global_step": 2}
    with pytest.raises(FileNotFoundError, match="step000006.ckpt is not a checkpoint: no checkpoints"):
        resolve_checkpoint(cut_short, tmp_path, "x")
