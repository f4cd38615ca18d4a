"""The forms of linear products on CPU (`cpu_linear.py`): weight-major and oneDNN-packed both compute `linear`, each
decoding step picks the form it runs fastest in, and decoding stays lossless whichever form runs."""

import contextlib
import gc
import threading
import time
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import make_oracle, make_target
from test_batching import N_NEW, ragged_batch
from torch.overrides import TorchFunctionMode

import blockpilot_hf.decoding
from blockpilot_hf import cpu_linear
from blockpilot_hf.cpu_linear import (
    MAX_WEIGHT_MAJOR_ROWS,
    PackedLinear,
    WeightMajorLinear,
    active_linear_form,
    fastest_linear_form,
    packing_available,
)
from blockpilot_hf.decoding import VerifyStep

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
ALL_FORMS = [contextlib.nullcontext, WeightMajorLinear, pytest.param(PackedLinear, marks=needs_onednn)]
LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise


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


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (2, 3, 48), (4, 16, 48), (300, 48)])
def test_packed_form_computes_linear(dtype, bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias, dtype=dtype).requires_grad_(False)
    x = torch.randn(*shape, dtype=dtype)
    with RecordCalls() as recorder, PackedLinear():
        out = layer(x)
        strided = layer(torch.randn(shape[0], 2 * 48, dtype=dtype)[:, ::2])  # a non-contiguous input
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=tolerance, atol=tolerance)
    assert out.shape == (*shape[:-1], 80) and out.dtype == dtype
    assert strided.shape == (shape[0], 80)
    assert LINEAR_POINTWISE in recorder.calls and F.linear not in recorder.calls


@needs_onednn
def test_packed_weight_follows_the_weight():
    """The packed copy is made once, made again when the weight is written in place or replaced, and goes with the
    layer."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80).requires_grad_(False)
    x = torch.randn(4, 48)
    with PackedLinear():
        layer(x)
        first = cpu_linear.packed_weight(layer)
        assert cpu_linear.packed_weight(layer) is first
        layer.weight.mul_(2)  # e.g. an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert cpu_linear.packed_weight(layer) is not first
        layer.weight = torch.nn.Parameter(torch.randn(80, 48), requires_grad=False)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    packed = weakref.ref(cpu_linear.packed_weight(layer))
    del layer
    gc.collect()
    assert packed() is None


@needs_onednn
def test_packed_copies_can_be_released():
    torch.manual_seed(0)
    model, other = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.Linear(80, 8)), torch.nn.Linear(48, 8)
    x = torch.randn(4, 48)
    with torch.no_grad(), PackedLinear():
        model(x), other(x)
    copies = [weakref.ref(cpu_linear.packed_weight(layer)) for layer in (*model, other)]
    assert cpu_linear.release_packed_weights(model) == 2
    gc.collect()
    assert [copy() is None for copy in copies] == [True, True, False]  # the other model keeps its copy
    assert cpu_linear.release_packed_weights() >= 1 and other not in cpu_linear._packed_weights
    with torch.no_grad(), PackedLinear():
        torch.testing.assert_close(model(x), model[1](F.linear(x, model[0].weight, model[0].bias)))  # packed again


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # what `mkldnn.flags` says on a CPU-only build
@pytest.mark.parametrize("case", ["grad", "dtype", "switched_off"])
def test_packed_form_leaves_what_it_cannot_do_to_linear(case):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    x = torch.randn(4, 48)
    if case == "dtype":
        layer = layer.to(torch.float64)
        x = x.to(torch.float64)
    with contextlib.ExitStack() as stack:
        if case == "switched_off":
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        recorder = stack.enter_context(RecordCalls())
        stack.enter_context(PackedLinear())
        out = layer(x)
    assert F.linear in recorder.calls and LINEAR_POINTWISE not in recorder.calls
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    if case == "grad":  # training through the layer still works inside the form
        out.sum().backward()
        assert layer.weight.grad is not None


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


@pytest.mark.parametrize("form", [WeightMajorLinear, pytest.param(PackedLinear, marks=needs_onednn)])
def test_wrapped_weights_keep_their_own_linear(form):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=False)
    layer.weight = torch.nn.Parameter(torch.randn(80, 48).as_subclass(WrappedTensor), requires_grad=False)
    x = torch.randn(4, 48)
    with RecordCalls() as recorder, form():
        out = layer(x)
    assert F.linear in recorder.calls and torch.mm not in recorder.calls and LINEAR_POINTWISE not in recorder.calls
    torch.testing.assert_close(out.as_subclass(torch.Tensor), F.linear(x, layer.weight.as_subclass(torch.Tensor)))


def test_the_usual_forward_comes_back_after_nested_scopes_and_errors():
    usual = torch.nn.Linear.forward
    with WeightMajorLinear():
        with PackedLinear():
            assert active_linear_form() is PackedLinear  # the innermost form applies
        assert active_linear_form() is WeightMajorLinear and torch.nn.Linear.forward is not usual
    assert active_linear_form() is None and torch.nn.Linear.forward is usual
    with pytest.raises(RuntimeError, match="inside"):
        with WeightMajorLinear():
            raise RuntimeError("inside")
    assert active_linear_form() is None and torch.nn.Linear.forward is usual


@pytest.mark.parametrize(
    "form, own_product",
    [(WeightMajorLinear, torch.mm), pytest.param(PackedLinear, LINEAR_POINTWISE, marks=needs_onednn)],
)
def test_other_threads_keep_the_usual_product(form, own_product):
    """The scope belongs to the thread that entered it: a model serving another thread at the same time keeps the usual
    `linear`, bit for bit."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80).requires_grad_(False)
    x = torch.randn(4, 48)
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait()
        with RecordCalls() as recorder:
            seen["out"] = layer(x)
        seen["calls"] = recorder.calls

    thread = threading.Thread(target=other_thread)
    thread.start()
    with form():
        inside.set()
        thread.join()
        with RecordCalls() as recorder:
            layer(x)
    assert own_product in recorder.calls  # this thread: the form's product
    assert F.linear in seen["calls"] and own_product not in seen["calls"]
    assert torch.equal(seen["out"], F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("fast_form", [contextlib.nullcontext, WeightMajorLinear, PackedLinear])
def test_the_step_keeps_the_form_it_runs_fastest_in(monkeypatch, fast_form):
    monkeypatch.setattr(cpu_linear, "packing_available", lambda: True)  # all three forms are candidates
    calls = []

    def step():  # a step that runs 20 ms faster in one of the forms, with a second-best 10 ms behind
        form = active_linear_form() or contextlib.nullcontext
        calls.append(form)
        ranks = [fast_form] + [f for f in (contextlib.nullcontext, WeightMajorLinear, PackedLinear) if f is not fast_form]
        time.sleep(0.01 * [0, 2, 3][ranks.index(form)])

    assert fastest_linear_form(step, rows=4, device=torch.device("cpu"), repeats=2) is fast_form
    assert calls == [contextlib.nullcontext, WeightMajorLinear, PackedLinear] * 3  # in turn: warm-up + two rounds


def test_steps_of_similar_speed_keep_the_usual_form():
    # 5 ms in every form: scheduler jitter is far below the 10 % a switch needs
    assert fastest_linear_form(lambda: time.sleep(0.005), rows=4, device=torch.device("cpu")) is contextlib.nullcontext


@pytest.mark.parametrize("rows", [1, MAX_WEIGHT_MAJOR_ROWS + 1])
def test_rows_outside_the_weight_major_range_are_measured_packed_or_not_at_all(monkeypatch, rows):
    for available in (True, False):
        monkeypatch.setattr(cpu_linear, "packing_available", lambda: available)
        calls = []
        fastest_linear_form(lambda: calls.append(active_linear_form()), rows, torch.device("cpu"), repeats=1)
        assert calls == ([None, PackedLinear] * 2 if available else [])


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_no_measurement_off_cpu(device):
    calls = []
    assert fastest_linear_form(lambda: calls.append(1), 4, torch.device(device)) is contextlib.nullcontext
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
    workspaces = list(target.__dict__["_blockpilot_workspaces"].values())
    steps = [step for w in workspaces for step in w.steps(4)]
    shapes = {step.shape for step in steps}
    assert len(measured) == len({step.shape for step, _ in measured}) == len(shapes)  # each shape once, in both requests
    for step, rows in measured:
        batch_size = step.block_ids.shape[0] if isinstance(step, VerifyStep) else step.anchor_ids.shape[0]
        assert step.shape == ("verify" if isinstance(step, VerifyStep) else "draft", batch_size, 4)
        assert rows == step.rows == batch_size * 4
        assert step.linear_form in (PackedLinear, WeightMajorLinear, contextlib.nullcontext)
    assert (2 * 4) in [rows for _, rows in measured]  # batch x block rows


def test_workspaces_of_other_capacities_reuse_the_measured_forms(monkeypatch):
    """A longer request needs a larger cache, hence a new workspace; its steps have the shapes already measured."""
    measured = []

    def recording(step, rows, device):
        measured.append(step.__self__.shape)
        return fastest_linear_form(step, rows, device)

    monkeypatch.setattr(blockpilot_hf.decoding, "fastest_linear_form", recording)
    target = make_target("llama", seed=4)
    ids, mask = ragged_batch(seed=22, batch=2)
    drafter = make_oracle(target, ids, 300, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    for max_new_tokens in (N_NEW, 300):  # 300 new tokens do not fit the first request's capacity
        target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False, max_new_tokens=max_new_tokens)
    workspaces = list(target.__dict__["_blockpilot_workspaces"].values())
    assert len({w.capacity for w in workspaces if w.batch_size == 2}) == 2
    assert len(measured) == len(set(measured))


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_decoding_is_lossless_in_every_form(monkeypatch, form, block_size):
    """Whatever the measurement picks on the machine at hand, every form gives the target's greedy output, for a
    ragged left-padded batch with partial acceptances (block size 1: plain decoding in the same loop)."""
    monkeypatch.setattr(blockpilot_hf.decoding, "fastest_linear_form", lambda step, rows, device: form)
    target = make_target("llama", seed=5, hidden_size=64)  # fresh: no workspace built under the other form
    ids, mask = ragged_batch(seed=21)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
    out = target.generate(ids, assistant_model=drafter, block_policy=block_size, **kwargs)
    assert torch.equal(out.sequences, target.generate(ids, assistant_model=None, **kwargs).sequences)
    if block_size > 1:
        assert max(max(steps) for steps in out.acceptance_lengths) > 1  # blocks were accepted in part or whole
    steps = [step for w in target.__dict__["_blockpilot_workspaces"].values() for pair in w._steps.values() for step in pair]
    ran = [step for step in steps if step.linear_form is not None]  # at block size 1 no draft step runs
    assert ran and all(step.linear_form is form for step in ran)


@needs_onednn
def test_prefill_runs_in_the_form_the_verify_steps_measured(monkeypatch):
    """The prompt's products are not timed themselves: the first request prefills in the usual form, the next ones in
    the form verify steps of their batch size measured."""
    monkeypatch.setattr(blockpilot_hf.decoding, "fastest_linear_form", lambda step, rows, device: PackedLinear)
    target = make_target("llama", seed=6, hidden_size=64)
    ids, mask = ragged_batch(seed=23)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    prefill_forms = []
    target.model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_forms.append(active_linear_form())
        if kwargs["input_ids"].shape[1] == ids.shape[1] else None,
        with_kwargs=True,
    )
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW)
    outputs = [target.generate(ids, assistant_model=drafter, block_policy=4, **kwargs) for _ in range(2)]
    assert prefill_forms == [None, PackedLinear]
    expected = target.generate(ids, assistant_model=None, **kwargs)
    assert all(torch.equal(out, expected) for out in outputs)
