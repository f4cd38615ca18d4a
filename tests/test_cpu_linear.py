"""The weight-major form of few-row linear products on CPU (`cpu_linear.py`): it computes `linear`, each decoding step
picks the form it runs faster in, and decoding stays lossless whichever form runs."""

import contextlib
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import make_oracle, make_target
from test_batching import N_NEW, ragged_batch
from torch.overrides import TorchFunctionMode

import blockpilot_hf.decoding
from blockpilot_hf.cpu_linear import MAX_WEIGHT_MAJOR_ROWS, WeightMajorLinear, fastest_linear_form, weight_major_enabled
from blockpilot_hf.decoding import VerifyStep


class RecordCalls(TorchFunctionMode):
    """Records which torch functions run."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 48), (1, 4, 48), (2, 3, 48), (4, 16, 48)])
def test_weight_major_form_computes_linear(bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with RecordCalls() as recorder, WeightMajorLinear():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert out.shape == (*shape[:-1], 80)
    assert torch.mm in recorder.calls and F.linear not in recorder.calls


@pytest.mark.parametrize("rows", [1, MAX_WEIGHT_MAJOR_ROWS + 1])
def test_one_row_and_many_rows_keep_linear(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(rows, 48)
    with RecordCalls() as recorder, WeightMajorLinear():
        out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))  # the very same kernel
    assert F.linear in recorder.calls and torch.mm not in recorder.calls


class WrappedTensor(torch.Tensor):
    """Stands in for a quantized or otherwise wrapped weight, whose `linear` the weight-major form must leave to it."""


def test_wrapped_weights_keep_their_own_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=False)
    layer.weight = torch.nn.Parameter(torch.randn(80, 48).as_subclass(WrappedTensor), requires_grad=False)
    x = torch.randn(4, 48)
    with RecordCalls() as recorder, WeightMajorLinear():
        out = layer(x)
    assert F.linear in recorder.calls and torch.mm not in recorder.calls
    torch.testing.assert_close(out.as_subclass(torch.Tensor), F.linear(x, layer.weight.as_subclass(torch.Tensor)))


def test_the_usual_forward_comes_back_after_nested_scopes_and_errors():
    usual = torch.nn.Linear.forward
    with WeightMajorLinear():
        with WeightMajorLinear():
            assert weight_major_enabled()
        assert weight_major_enabled() and torch.nn.Linear.forward is not usual
    assert not weight_major_enabled() and torch.nn.Linear.forward is usual
    with pytest.raises(RuntimeError, match="inside"):
        with WeightMajorLinear():
            raise RuntimeError("inside")
    assert not weight_major_enabled() and torch.nn.Linear.forward is usual


def test_other_threads_keep_the_usual_product():
    """The scope belongs to the thread that entered it: a model serving another thread at the same time keeps the usual
    `linear`, bit for bit."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(4, 48)
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait()
        with RecordCalls() as recorder:
            seen["out"] = layer(x)
        seen["calls"] = recorder.calls

    thread = threading.Thread(target=other_thread)
    thread.start()
    with WeightMajorLinear():
        inside.set()
        thread.join()
        with RecordCalls() as recorder:
            layer(x)
    assert torch.mm in recorder.calls  # this thread: weight-major
    assert F.linear in seen["calls"] and torch.mm not in seen["calls"]
    assert torch.equal(seen["out"], F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("slow_form", ["usual", "weight_major"])
def test_the_step_keeps_the_form_it_runs_faster_in(slow_form):
    calls = []

    def step():  # a step that is 20 ms slower in one of the forms
        calls.append(weight_major_enabled())
        if calls[-1] == (slow_form == "weight_major"):
            time.sleep(0.02)

    form = fastest_linear_form(step, rows=4, device=torch.device("cpu"), repeats=2)
    assert form is (contextlib.nullcontext if slow_form == "weight_major" else WeightMajorLinear)
    assert calls == [False, True] * 3  # alternating, a warm-up round and two measured rounds


def test_steps_of_similar_speed_keep_the_usual_form():
    # 5 ms either way: scheduler jitter is far below the 10 % a switch needs
    assert fastest_linear_form(lambda: time.sleep(0.005), rows=4, device=torch.device("cpu")) is contextlib.nullcontext


@pytest.mark.parametrize("rows, device", [(1, "cpu"), (MAX_WEIGHT_MAJOR_ROWS + 1, "cpu"), (4, "cuda"), (4, "meta")])
def test_no_measurement_where_the_form_cannot_matter(rows, device):
    calls = []
    assert fastest_linear_form(lambda: calls.append(1), rows, torch.device(device)) is contextlib.nullcontext
    assert not calls


def test_each_step_measures_itself_once(monkeypatch):
    measured = []

    def recording(step, rows, device):
        measured.append((step.__self__, rows))
        return fastest_linear_form(step, rows, device)

    monkeypatch.setattr(blockpilot_hf.decoding, "fastest_linear_form", recording)
    target = make_target("llama", seed=4)
    ids, mask = ragged_batch(seed=22, batch=2)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    for _ in range(2):
        target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=N_NEW)
    steps = [step for w in target.__dict__["_blockpilot_workspaces"].values() for step in w.steps(4)]
    assert len(measured) == len({id(step) for step, _ in measured}) == len(steps)  # each once, in both requests
    for step, rows in measured:
        batch_size = step.block_ids.shape[0] if isinstance(step, VerifyStep) else step.anchor_ids.shape[0]
        assert rows == step.rows == batch_size * 4
        assert step.linear_form in (WeightMajorLinear, contextlib.nullcontext)
    assert (2 * 4) in [rows for _, rows in measured]  # batch x block rows


@pytest.mark.parametrize("weight_major", [True, False])
@pytest.mark.parametrize("block_size", [2, 4])
def test_decoding_is_lossless_in_either_form(monkeypatch, weight_major, block_size):
    """Whatever the measurement picks on the machine at hand, both forms give the target's greedy output, for a
    ragged left-padded batch with partial acceptances."""
    form = WeightMajorLinear if weight_major else contextlib.nullcontext
    monkeypatch.setattr(blockpilot_hf.decoding, "fastest_linear_form", lambda step, rows, device: form)
    target = make_target("llama", seed=5, hidden_size=64)  # fresh: no workspace built under the other form
    ids, mask = ragged_batch(seed=21)
    drafter = make_oracle(target, ids, N_NEW, block_size=block_size, corrupt_fraction=0.35, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
    out = target.generate(ids, assistant_model=drafter, **kwargs)
    assert torch.equal(out.sequences, target.generate(ids, assistant_model=None, **kwargs).sequences)
    assert max(max(steps) for steps in out.acceptance_lengths) > 1  # blocks were accepted in part or whole
    steps = [step for w in target.__dict__["_blockpilot_workspaces"].values() for pair in w._steps.values() for step in pair]
    assert steps and all(step.linear_form is form for step in steps)
