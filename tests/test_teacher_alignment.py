"""The teacher's states in a real training step line up with its own conversation, token for token.

One ``SelfDistillationModule`` step in a real ``lightning.Trainer`` (see ``tests/fixed_step.py``) on two prompts
of different lengths × two fixed, right-padded responses of different lengths; what the step hands to the
distillation loss is recorded. Pinned:

- with contexts ``[None, c, None, c']`` (``c`` and ``c'`` of different lengths), the teacher states of a row
  with a context equal a plain, unpadded forward of that row's teacher conversation (its own prompt with its
  own context, rendered with the chat template) followed by its response, at the positions that predict each
  response token; the student states likewise for the student conversation; for the EMA and the live teacher;
- rows without a context weigh nothing: zero token weights, and garbage teacher states there change neither
  the loss nor its gradients;
- with ``use_reference_answer``, the answers handed to ``build_contexts`` are each group's own prompt's, in
  order, and each row's teacher is shown its own prompt's answer.
"""

import pytest
import torch

import demopsd.training.steps
from tests.fixed_step import LossCalls, default_tokenizer, example, replay, response_outputs, setup_step, unpadded

BATCH = [
    example("Which option is one?", "A", idx=0),
    example("Among the options listed below, which one names the number that comes right after two?", "C", idx=1),
]
RESPONSES = ["<answer>\nA\n</answer>", "It could be B or D, let me think again", "C", "<answer>\nC"]
NO_REWARD = [0.0] * 4
CONTEXTS = [
    None,
    "Correct solution:\n\nA",
    None,
    "Correct solution:\n\n<reasoning>\nTwo comes after one, three after two: that is option C.\n</reasoning>\n"
    "<answer>\nC\n</answer>",
]
SETTINGS = ["rollout.n=2", "rollout.temperature=1.0", "optim.lr=1e-3"]


def chat_ids(system: str, user: str) -> torch.Tensor:
    """The tokens of a system + user conversation with the generation prompt, as the model is prompted."""
    tokenizer = default_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True,
    )
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def teacher_ids(step, example, context: str) -> torch.Tensor:
    return chat_ids(example.system, step.cfg.method.reprompt.template.format(prompt=example.prompt, context=context))


def row_spans(served) -> list[slice]:
    """Where each row's response tokens sit among the flattened ``[valid]`` tokens handed to the loss."""
    ends = served.response_mask.sum(-1).cumsum(0).tolist()
    return [slice(end - int(length), end) for end, length in zip(ends, served.response_mask.sum(-1))]


def expected_states(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return response_outputs(model, prompt_ids, response_ids)[0]


def run_step(monkeypatch, method: str, *overrides: str, contexts=None):
    """One step on ``BATCH``; returns the step, its recorded loss call and the rollouts it was served."""
    step = setup_step(monkeypatch, method, RESPONSES, NO_REWARD, *SETTINGS, *overrides)
    if contexts is not None:
        monkeypatch.setattr(demopsd.training.steps, "build_contexts", lambda *args, **kwargs: list(contexts))
    losses = LossCalls(monkeypatch)
    step.fit(BATCH)
    (call,) = losses.calls
    return step, call, step.rollouts.served[0]


@pytest.mark.parametrize("teacher", ["ema", "live"])
def test_teacher_and_student_states_are_those_of_each_rows_own_unpadded_conversation(teacher, monkeypatch):
    step, call, served = run_step(monkeypatch, "sdpo", f"method.teacher={teacher}", contexts=CONTEXTS)
    examples = [e for e in BATCH for _ in range(2)]
    # the premise: teacher prompts, student prompts and responses all of different lengths
    assert len({len(teacher_ids(step, examples[i], CONTEXTS[i])) for i in (1, 3)}) == 2
    assert len(set(served.prompt.mask.sum(-1).tolist())) == 2
    assert len(set(served.response_mask.sum(-1).tolist())) == 4

    for row, span in enumerate(row_spans(served)):
        prompt, response = unpadded(served, row)
        assert torch.equal(prompt, chat_ids(examples[row].system, examples[row].prompt)), f"row {row}: student prompt"
        torch.testing.assert_close(call["student_hidden"][span], expected_states(step.initial, prompt, response),
                                   atol=1e-5, rtol=0, msg=f"row {row}: student states")
        if CONTEXTS[row] is not None:
            expected = expected_states(step.initial, teacher_ids(step, examples[row], CONTEXTS[row]), response)
            torch.testing.assert_close(call["teacher_hidden"][span], expected, atol=1e-5, rtol=0,
                                       msg=f"row {row}: teacher states")


def test_rows_without_a_context_weigh_nothing_in_the_loss(monkeypatch):
    step, call, served = run_step(monkeypatch, "sdpo", contexts=CONTEXTS)
    spans = row_spans(served)
    without = torch.zeros_like(call["token_weights"], dtype=torch.bool)
    for row in (0, 2):
        without[spans[row]] = True
    assert (call["token_weights"][without] == 0).all()
    assert (call["token_weights"][~without] > 0).all()

    garbage = call["teacher_hidden"].clone()
    garbage[without] = 1e3 * torch.randn_like(garbage[without])

    def loss_and_gradients(teacher_hidden):
        hidden = call["student_hidden"].clone().requires_grad_()
        head = call["student_head"].clone().requires_grad_()
        loss, _ = replay(call, student_hidden=hidden, student_head=head, teacher_hidden=teacher_hidden)
        return (loss, *torch.autograd.grad(loss, [hidden, head]))

    clean, dirty = loss_and_gradients(call["teacher_hidden"]), loss_and_gradients(garbage)
    assert clean[0] > 0
    for name, a, b in zip(("loss", "student-state gradient", "head gradient"), clean, dirty):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6, msg=f"{name} depends on a row without a context")


def test_reference_answers_reach_each_groups_own_rows_in_order(monkeypatch):
    recorded = []
    real_build_contexts = demopsd.training.steps.build_contexts

    def recording_build_contexts(*args, **kwargs):
        contexts = real_build_contexts(*args, **kwargs)
        recorded.append((kwargs["answers"], contexts))
        return contexts

    monkeypatch.setattr(demopsd.training.steps, "build_contexts", recording_build_contexts)
    step, call, served = run_step(monkeypatch, "opsd", "method.reprompt.use_reference_answer=true")

    ((answers, contexts),) = recorded
    assert answers == ["A", "C"]
    template = step.cfg.method.reprompt.answer_template
    assert contexts == [template.format(answer=a) for a in ("A", "A", "C", "C")]
    examples = [e for e in BATCH for _ in range(2)]
    for row, span in enumerate(row_spans(served)):
        own_answer = teacher_ids(step, examples[row], template.format(answer=examples[row].answer))
        expected = expected_states(step.initial, own_answer, unpadded(served, row)[1])
        torch.testing.assert_close(call["teacher_hidden"][span], expected, atol=1e-5, rtol=0,
                                   msg=f"row {row}: the teacher was not shown its own answer")
