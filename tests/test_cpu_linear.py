"""The forms of linear products on CPU (`cpu_linear.py`): weight-major and oneDNN-packed both compute `linear`,
decoding runs the measured form (per row count, the faster of packed and usual as this machine timed them once), and
decoding stays lossless whichever form runs. (The loop's steps and prefill running in that form: `test_decoding.py`.)"""

import contextlib
import gc
import json
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from blockpilot_hf import cpu_linear
from blockpilot_hf.cpu_linear import (
    MAX_WEIGHT_MAJOR_ROWS,
    TIMED_ROWS,
    MeasuredLinear,
    PackedLinear,
    WeightMajorLinear,
    active_linear_form,
    decoding_linear_form,
)
from helpers.decoding import built_steps, needs_onednn, use_linear_form
from helpers.models import make_target, ragged_batch
from helpers.oracle import make_oracle

N_NEW = 24
ALL_FORMS = [
    contextlib.nullcontext,
    WeightMajorLinear,
    pytest.param(PackedLinear, marks=needs_onednn),
    pytest.param(MeasuredLinear, marks=needs_onednn),
]
# Packed at 1, 4, 16, 64, 256 rows, usual at 2, 8, 32, 128: both forms run within one decoding request.
ALTERNATING = tuple(i % 2 == 0 for i in range(len(TIMED_ROWS)))
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


@pytest.mark.parametrize("available", [True, False])
def test_decoding_runs_the_measured_form_on_cpu_wherever_oneDNN_packs(monkeypatch, available):
    monkeypatch.setattr(cpu_linear, "packing_available", lambda: available)
    expected = MeasuredLinear if available else contextlib.nullcontext
    assert decoding_linear_form(torch.device("cpu")) is expected
    assert decoding_linear_form("cpu") is expected


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_off_cpu_decoding_keeps_the_usual_linear(device):
    assert decoding_linear_form(torch.device(device)) is contextlib.nullcontext


def test_leaving_a_form_keeps_a_patch_made_meanwhile():
    """Another library patching `nn.Linear.forward` while a form is active keeps its patch when the form ends; products
    still reach the form's forward inside it and the usual one outside."""
    usual = torch.nn.Linear.forward
    layer, x = torch.nn.Linear(8, 4), torch.randn(3, 8)
    seen = []
    try:
        with WeightMajorLinear():
            inner = torch.nn.Linear.forward

            def other_patch(self, input):
                seen.append(len(input))
                return inner(self, input)

            torch.nn.Linear.forward = other_patch
        assert torch.nn.Linear.forward is other_patch  # not undone
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        with PackedLinear():  # entering again does not wrap the other patch around itself
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.nn.Linear.forward is other_patch and seen == [3, 3]
    finally:
        torch.nn.Linear.forward = usual
        cpu_linear._installed = False


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_form_packs_exactly_the_row_counts_timed_faster(monkeypatch, dtype):
    monkeypatch.setitem(cpu_linear._measured, dtype, ALTERNATING)
    layer = torch.nn.Linear(48, 80, dtype=dtype).requires_grad_(False)
    for rows in range(1, 300):
        x = torch.randn(rows, 48, dtype=dtype)
        with RecordCalls() as recorder, MeasuredLinear():
            out = layer(x.view(1, rows, 48))
        timed_at = next((i for i, count in enumerate(TIMED_ROWS) if count >= rows), len(TIMED_ROWS) - 1)
        assert (LINEAR_POINTWISE in recorder.calls) is ALTERNATING[timed_at], rows
        assert (F.linear in recorder.calls) is not ALTERNATING[timed_at], rows
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[0], F.linear(x, layer.weight, layer.bias), rtol=tolerance, atol=tolerance)


class FakeTimer:
    """Stands in for `time_linear_forms`: packed faster at `packed_faster` row counts (None: a busy machine)."""

    def __init__(self, packed_faster):
        self.packed_faster, self.calls = packed_faster, []

    def __call__(self, dtype):
        self.calls.append(dtype)
        if self.packed_faster is None:
            return None
        return {n: {"usual": 1.0, "packed": 0.5 if fast else 2.0} for n, fast in zip(TIMED_ROWS, self.packed_faster)}


def test_timings_are_kept_per_machine_and_dtype_and_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "_measured", {})
    timer = FakeTimer(ALTERNATING)
    monkeypatch.setattr(cpu_linear, "time_linear_forms", timer)
    assert cpu_linear.measured_forms(torch.float32) == ALTERNATING
    kept = json.loads((tmp_path / "linear_forms.json").read_text())
    assert kept["machine"] == cpu_linear._machine() and set(kept["seconds"]) == {"float32"}
    assert cpu_linear.measured_forms(torch.float32) == ALTERNATING and len(timer.calls) == 1  # once per process
    monkeypatch.setattr(cpu_linear, "_measured", {})  # a new process reads the file
    assert cpu_linear.measured_forms(torch.float32) == ALTERNATING and len(timer.calls) == 1
    timer.packed_faster = (False,) * len(TIMED_ROWS)  # each dtype is timed on its own, next to the other
    assert cpu_linear.measured_forms(torch.bfloat16) == timer.packed_faster and timer.calls[-1] == torch.bfloat16
    assert set(json.loads((tmp_path / "linear_forms.json").read_text())["seconds"]) == {"float32", "bfloat16"}
    monkeypatch.setattr(cpu_linear, "_measured", {})
    monkeypatch.setattr(cpu_linear, "_machine", lambda: "another CPU; 2 threads; torch 0")  # another machine
    assert cpu_linear.measured_forms(torch.float32) == timer.packed_faster and len(timer.calls) == 3


@pytest.mark.parametrize("kept", ['{"machine": "torn', "[]", ""])
def test_an_unreadable_timings_file_is_timed_again(monkeypatch, tmp_path, kept):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "_measured", {})
    (tmp_path / "linear_forms.json").write_text(kept)
    timer = FakeTimer(ALTERNATING)
    monkeypatch.setattr(cpu_linear, "time_linear_forms", timer)
    assert cpu_linear.measured_forms(torch.float32) == ALTERNATING and len(timer.calls) == 1
    assert json.loads((tmp_path / "linear_forms.json").read_text())["seconds"]["float32"]["1"]["packed"] == 0.5


def test_a_busy_machine_runs_packed_and_keeps_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "_measured", {})
    monkeypatch.setattr(cpu_linear, "time_linear_forms", FakeTimer(None))
    assert cpu_linear.measured_forms(torch.float32) == (True,) * len(TIMED_ROWS)
    assert not (tmp_path / "linear_forms.json").exists()  # the next process times again


@needs_onednn
def test_timing_times_both_forms_and_sees_a_busy_machine():
    timings = cpu_linear.time_linear_forms(torch.bfloat16, rows=(1, 8), rounds=1, passes=1, min_cpu_share=0.0)
    assert set(timings) == {1, 8} and all(set(t) == {"usual", "packed"} for t in timings.values())
    assert all(s > 0 for t in timings.values() for s in t.values())
    # no process runs more CPU seconds than its threads' wall time: the busy test always trips
    assert cpu_linear.time_linear_forms(torch.bfloat16, rows=(1, 8), rounds=1, passes=1, min_cpu_share=1.01) is None


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_decoding_is_lossless_in_every_form(monkeypatch, form, block_size):
    """Whatever form the steps run in on the machine at hand, every form gives the target's greedy output, for a
    ragged left-padded batch with partial acceptances (block size 1: plain decoding in the same loop); the measured
    form with packed and usual products mixed in one request."""
    monkeypatch.setitem(cpu_linear._measured, torch.float32, ALTERNATING)
    use_linear_form(monkeypatch, form)
    target = make_target("llama", seed=5, hidden_size=64)  # fresh: no workspace built under the other form
    ids, mask = ragged_batch(seed=21)
    drafter = make_oracle(target, ids, N_NEW, block_size=4, corrupt_fraction=0.35, attention_mask=mask)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True)
    out = target.generate(ids, assistant_model=drafter, block_policy=block_size, **kwargs)
    assert torch.equal(out.sequences, target.generate(ids, assistant_model=None, **kwargs).sequences)
    if block_size > 1:
        assert max(max(steps) for steps in out.acceptance_lengths) > 1  # blocks were accepted in part or whole
    ran = [step for step in built_steps(target) if step.linear_form is not None]  # at block size 1 no draft step runs
    assert ran and all(step.linear_form is form for step in ran)
