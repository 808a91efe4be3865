"""bench/gpu.py in tiny shapes on the CPU, so that the GPU benchmark cannot rot between GPU runs."""

import json
import math

import pytest

from tests.helpers import run_python

ROWS = [
    "loss full: extra memory", "loss full: forward + backward", "loss chunked: extra memory",
    "loss chunked: forward + backward", "loss chunked − full", "step: tokens/s", "step: seconds", "step: peak memory",
    "student forward + backward: seconds", "student forward + backward: TFLOP/s", "student forward + backward: MFU",
    "rollouts hf: tokens/s", "rollouts vllm: tokens/s", "rollouts vllm / hf", "vllm start-up", "vllm weight push",
    "colocated step: seconds", "colocated: generation", "colocated: sleep", "colocated: training step",
    "colocated: wake", "colocated: weight push",
]
PHASES = ("generation", "sleep", "training step", "wake", "weight push")


def run_bench(out, *flags: str) -> tuple[dict, str]:
    """``bench/gpu.py --tiny`` with ``flags``: its JSON results and its Markdown table, after checking that it
    printed the table it wrote."""
    result = run_python("bench/gpu.py", "--tiny", "--out", str(out), *flags, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "gpu.md").read_text()
    assert text in result.stdout
    return json.loads((out / "gpu.json").read_text()), text


def table(text: str) -> dict[str, str]:
    """The Markdown table's ``measurement -> value``."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[1].strip() for cells in rows[1:]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("gpu-bench"), "--skip-vllm")


def test_the_chunked_loss_is_the_full_losss_within_float32_rounding(tiny_run):
    results, _ = tiny_run
    loss = results["loss"]
    assert loss["full"]["loss"] > 1e-5  # a loss that is not zero: the agreement below says something
    assert loss["chunked"]["loss"] == pytest.approx(loss["full"]["loss"], rel=1e-5)
    assert loss["rel_diff"] < 1e-5
    for path in ("full", "chunked"):
        assert loss[path]["extra_mib"] > 0
        assert loss[path]["seconds"] > 0


def test_the_step_reports_throughput_and_flops_but_no_mfu_on_a_cpu(tiny_run):
    results, _ = tiny_run
    step, shapes, arch = results["step"], results["shapes"], results["shapes"]["architecture"]
    assert results["machine"]["device"].startswith(("x86_64 CPU", "aarch64 CPU", "arm64 CPU"))
    assert results["machine"]["dtype"] == "float32"
    assert math.isfinite(step["loss"]) and step["loss"] > 0
    tokens = shapes["rows"] * (shapes["prompt_tokens"] + shapes["response_tokens"])
    assert step["tokens_per_step"] == tokens
    assert step["tokens_per_second"] == pytest.approx(tokens / step["step_seconds"])
    assert step["tokens_per_second"] > 0 and step["student_seconds"] > 0 and step["peak_mib"] > 0
    # the formula, from the architecture: tied embeddings, so the only matrix outside the body is V x H
    vocab, hidden = arch["vocab_size"], arch["hidden_size"]
    sequence = shapes["prompt_tokens"] + shapes["response_tokens"]
    expected = (6 * (step["parameters"] - vocab * hidden) * tokens
                + 6 * vocab * hidden * shapes["rows"] * shapes["response_tokens"]
                + 12 * arch["num_hidden_layers"] * arch["num_attention_heads"] * arch["head_dim"] * sequence * tokens)
    assert step["student_flops"] == expected
    assert step["student_flop_per_second"] == pytest.approx(expected / step["student_seconds"])
    assert step["peak_flop_per_second"] is None and step["mfu"] is None


def test_hf_rollouts_make_every_requested_token(tiny_run):
    results, _ = tiny_run
    shapes, rollouts = results["shapes"], results["rollouts"]
    assert rollouts["hf"]["tokens"] == shapes["rollout_prompts"] * shapes["n"] * shapes["max_new_tokens"]
    assert rollouts["hf"]["tokens_per_second"] > 0
    assert rollouts["vllm"] == results["colocated"] == {"skipped": "skipped (--skip-vllm)"}
    assert "vllm_over_hf" not in rollouts


def test_the_markdown_has_a_row_for_every_measurement(tiny_run):
    results, text = tiny_run
    values = table(text)
    assert list(values) == ROWS
    assert values["student forward + backward: MFU"] == "–"
    assert values["rollouts vllm: tokens/s"] == "skipped (--skip-vllm)"
    assert all(values[f"colocated: {phase}"] == "skipped (--skip-vllm)" for phase in PHASES)
    assert values["step: tokens/s"] == f"{results['step']['tokens_per_second']:,.0f}"
    assert values["loss chunked: extra memory"] == f"{results['loss']['chunked']['extra_mib']:,.0f} MiB"
    for shape in ("N = 256 tokens", "V = 512", "2 rows × (16 prompt + 32 response tokens)", "2 prompts × 2 samples"):
        assert shape in text


@pytest.mark.slow
def test_vllm_and_generate_make_the_same_tokens_and_the_weight_push_is_timed(tmp_path):
    results, text = run_bench(tmp_path, "--kv-cache-bytes", "200000000")  # vLLM's CPU build: a small KV cache
    shapes, rollouts = results["shapes"], results["rollouts"]
    hf, vllm = rollouts["hf"], rollouts["vllm"]
    assert "error" not in vllm, vllm
    assert vllm["tokens"] == hf["tokens"] == shapes["rollout_prompts"] * shapes["n"] * shapes["max_new_tokens"]
    assert vllm["weight_push_seconds"] > 0 and vllm["startup_seconds"] > 0 and vllm["tokens_per_second"] > 0
    assert rollouts["vllm_over_hf"] == pytest.approx(vllm["tokens_per_second"] / hf["tokens_per_second"])
    values = table(text)
    assert values["rollouts vllm: tokens/s"] == f"{vllm['tokens_per_second']:,.0f}"
    assert values["vllm weight push"] == f"{vllm['weight_push_seconds']:,.3f} s"
    # the engine as rollout=vllm builds it on a CPU: the model's dtype, eager, no sleep mode
    assert shapes["vllm"] == {
        "dtype": "float32", "enforce_eager": True, "enable_sleep_mode": False, "sleep_level": 0,
        "gpu_memory_utilization": 0.5, "kv_cache_memory_bytes": 200_000_000, "tensor_parallel_size": 1}
    colocated = results["colocated"]
    assert "error" not in colocated, colocated
    assert colocated["sleep_level"] == 0 and colocated["sleep"] is None and colocated["wake"] is None
    ran = [colocated[phase] for phase in ("generation", "training step", "weight push")]
    assert min(ran) > 0 and colocated["seconds"] >= sum(ran)
    assert math.isfinite(colocated["loss"]) and colocated["loss"] > 0
    assert values["colocated: sleep"] == values["colocated: wake"] == "–"
    assert values["colocated: training step"] == f"{colocated['training step']:,.3f} s"
    assert values["colocated step: seconds"] == f"{colocated['seconds']:,.3f} s"


def test_the_colocated_step_sleeps_through_training_and_wakes_for_the_push(monkeypatch):
    """The cycle with sleep mode (the default on CUDA), on a stand-in for ``vllm.LLM`` built from the installed
    vLLM's signatures: the engine's calls in ``rollout=vllm``'s order, every phase timed, the trained weights
    pushed."""
    import torch

    from bench import gpu
    from demopsd.rollout.vllm import Colocation, import_vllm
    from tests.test_vllm_colocate import WAKE, FakeVLLM

    fake, device = FakeVLLM(monkeypatch), torch.device("cpu")
    model = gpu.build_model("tiny", device, torch.float32)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    colocation = Colocation(gpu.PhaseClock(fake.llm, device), model, torch.float32, 2)
    prompts = gpu.random_prompts(2, 8, model.config.vocab_size, device)
    requests, params = gpu.rollout_requests(import_vllm(), prompts, gpu.TINY)
    result = gpu.colocated_step(colocation, requests, params, gpu.TINY, device)

    # the warm-up cycle starts from an awake engine holding dummy weights; the timed one from a sleeping engine
    warm_up = ["push", "reset_prefix_cache()", "generate", "sleep(level=2)"]
    assert fake.calls() == [*warm_up, *WAKE, "generate", "sleep(level=2)"]
    assert result["sleep_level"] == 2
    assert min(result[phase] for phase in PHASES) > 0
    assert result["seconds"] >= sum(result[phase] for phase in PHASES)
    first, second = (dict(push) for push in fake.pushes)
    assert all(torch.equal(first[name], initial[name]) for name in initial)
    assert not all(torch.equal(second[name], initial[name]) for name in initial)  # after a training step


def test_running_out_of_memory_is_recorded_and_shown_not_raised(tiny_run):
    import torch

    from bench import gpu

    def full_path_on_a_small_gpu(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.69 GiB\nmore detail")

    results, _ = tiny_run
    error = gpu.guarded(full_path_on_a_small_gpu, "full")
    assert error == {"error": "out of memory: CUDA out of memory. Tried to allocate 8.69 GiB"}
    values = table(gpu.markdown({**results, "loss": {**results["loss"], "full": error}}))
    assert values["loss full: extra memory"] == values["loss full: forward + backward"] == error["error"]
    assert values["loss chunked: extra memory"] == f"{results['loss']['chunked']['extra_mib']:,.0f} MiB"
