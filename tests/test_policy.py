"""The learned block policy: `BlockPolicy` (modeling_policy.py) and its training (training/policy.py)."""

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel

import blockpilot_hf  # noqa: F401  (registers BlockPolicy with AutoConfig/AutoModel)
from blockpilot_hf import BlockPolicy, BlockPolicyConfig
from blockpilot_hf.features import PrefillRepresentation
from blockpilot_hf.hardware import machine_of
from blockpilot_hf.configuration import Arm, policy_arms
from blockpilot_hf.modeling_policy import block_sizes_for_batch, decide_for_batch
from blockpilot_hf.training.data import read_jsonl
from blockpilot_hf.training.policy import (
    PolicyTrainingArguments,
    best_arms,
    cost_file_paths,
    fit_policy,
    label_arms,
    load_step_costs,
    pooled_tau,
    read_cost_files,
    row_tau,
    step_costs_device,
    step_costs_machine,
    train_policy_from_files,
)
from helpers.models import VOCAB, make_drafter, make_prompt, make_target

N_NEW = 12


@pytest.fixture(scope="module")
def setup():
    target = make_target("llama", seed=0)
    drafter = make_drafter(target, block_size=4)
    return target, drafter, make_prompt(3, length=6)


def random_policy(target, drafter, candidates=(2, 3, 4, 5, 6), seed=0):
    torch.manual_seed(seed)
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=list(candidates), hidden_size=16)
    with torch.no_grad():  # non-trivial standardisation, so the buffers' round trip matters
        policy.feature_mean.normal_()
        policy.feature_std.uniform_(0.5, 2.0)
    return policy.eval()


def random_prefill(batch=8, vocab=VOCAB, hidden=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PrefillRepresentation(
        last_logits=3 * torch.randn(batch, vocab, generator=gen),
        last_hidden_state=torch.randn(batch, hidden, generator=gen),
        prompt_lengths=torch.randint(1, 200, (batch,), generator=gen),
    )


# ----------------------------------------------------------------------------------------------- model


def test_save_load_round_trip_and_auto_classes(tmp_path, setup):
    target, drafter, _ = setup
    policy = random_policy(target, drafter)
    policy.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}

    loaded = BlockPolicy.from_pretrained(tmp_path).eval()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "block_policy"
    auto = AutoModel.from_pretrained(tmp_path).eval()  # registered by `import blockpilot_hf`
    assert isinstance(auto, BlockPolicy) and isinstance(auto.config, BlockPolicyConfig)
    for other in (loaded, auto):
        assert other.config.candidate_block_sizes == [2, 3, 4, 5, 6]
        assert other.config.drafter_block_size == 4
        assert other.config.target_vocab_size == VOCAB and other.config.target_hidden_size == 32
        for name, tensor in policy.state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], tensor, rtol=0, atol=0)
        prefill = random_prefill()
        features = policy.features(prefill)
        torch.testing.assert_close(other(features), policy(features), rtol=0, atol=0)
        assert torch.equal(other.choose_block_sizes(prefill), policy.choose_block_sizes(prefill))


def test_choose_block_sizes_picks_candidates(setup):
    target, drafter, _ = setup
    candidates = [3, 5, 8]
    chosen = set()
    for seed in range(4):
        policy = random_policy(target, drafter, candidates, seed=seed)
        sizes = policy.choose_block_sizes(random_prefill(batch=16, seed=seed))
        assert sizes.shape == (16,) and sizes.dtype == torch.long
        assert set(sizes.tolist()) <= set(candidates)
        chosen |= set(sizes.tolist())
    assert len(chosen) > 1  # not a constant: the choice depends on the prefill


@pytest.mark.parametrize("other", [dict(hidden_size=64), dict(vocab_size=128)])
def test_policy_for_another_target_is_refused_at_generate(setup, other):
    target, drafter, ids = setup
    foreign = make_target("llama", seed=5, **other)
    policy = BlockPolicy.from_target(foreign, candidate_block_sizes=[2, 3, 4]).eval()
    with pytest.raises(ValueError, match="trained for a target with vocabulary .* Train a policy for this target"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, max_new_tokens=4)


def test_policy_for_another_drafter_block_size_is_refused(setup):
    target, drafter, ids = setup
    policy = random_policy(target, make_drafter(target, block_size=6), candidates=(4, 5, 6))
    with pytest.raises(ValueError, match="block size 6, but the drafter's is 4"):
        policy.check_compatible(drafter)
    with pytest.raises(ValueError, match="block size 6, but the drafter's is 4"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, max_new_tokens=4)
    policy.config.drafter_block_size = None  # unknown training drafter: nothing to check
    policy.check_compatible(drafter)


@pytest.mark.parametrize("favoured", [0, 3])
def test_generate_reports_the_policys_choice(setup, favoured):
    target, drafter, ids = setup
    policy = random_policy(target, drafter, candidates=(2, 3, 4, 5, 6))
    with torch.no_grad():
        policy.tau_head.bias.zero_()
        policy.tau_head.bias[favoured] = 1e3
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    prefill = PrefillRepresentation(
        last_logits=out.logits[:, -1], last_hidden_state=out.hidden_states[-1][:, -1], prompt_lengths=torch.tensor([6])
    )
    expected = int(policy.choose_block_sizes(prefill)[0])
    assert expected == policy.config.candidate_block_sizes[favoured]
    result = target.generate(
        ids, assistant_model=drafter, block_policy=policy, do_sample=False, max_new_tokens=N_NEW, return_dict_in_generate=True
    )
    assert result.block_sizes == [expected]
    assert max(result.acceptance_lengths[0]) <= expected
    assert torch.equal(result.sequences, target.generate(ids, do_sample=False, max_new_tokens=N_NEW))


# ----------------------------------------------------------------------------------------------- labels and training


def label_row(pid, taus: dict, steps: dict | None = None, features=None):
    return {
        "prompt_id": pid,
        "tau": {str(b): t for b, t in taus.items()},
        "steps": {str(b): s for b, s in (steps or {b: 10 for b in taus}).items()},
        "summary_features": features or [0.0] * 6,
    }


def test_best_block_sizes_ties_and_objectives():
    rows = [
        label_row("a", {2: 1.5, 3: 2.0, 4: 2.0}),  # tie 3/4 -> the smaller
        label_row("b", {2: 3.0, 3: 3.0, 4: 3.0}),  # all tied -> the smallest
        label_row("c", {2: 1.0, 3: 1.2, 4: 2.5}),
    ]
    def best(sizes, *args):
        return [arm.block_size for arm in best_arms(rows, [Arm(b) for b in sizes], *args)]

    assert best([4, 3, 2]) == [3, 2, 4]  # in any order
    costs = {"2": 1.0, "3": 1.5, "4": 2.0}  # tau / cost: a 1.5,1.33,1.0  b 3.0,2.0,1.5  c 1.0,0.8,1.25
    assert best([2, 3, 4], "throughput", costs) == [2, 2, 4]
    # block size 1 is plain decoding: tau exactly 1, so it wins where drafting does not pay for its cost
    costs["1"] = 0.9  # tau / cost at 1: 1.11 for every row
    assert best([1, 2, 3, 4], "throughput", costs) == [2, 2, 4]
    costs["1"] = 0.7  # 1.43: beats c's 1.25, not a's 1.5
    assert best([1, 2, 3, 4], "throughput", costs) == [2, 2, 1]


def test_pooled_tau_weights_by_steps():
    rows = [label_row("a", {2: 2.0, 4: 3.0}, {2: 10, 4: 4}), label_row("b", {2: 1.0, 4: 1.5}, {2: 2, 4: 2})]
    assert pooled_tau(rows, [Arm(4), Arm(2)]) == pytest.approx((3.0 * 4 + 1.0 * 2) / (4 + 2))
    assert pooled_tau(rows, [Arm(2), Arm(2)]) == pytest.approx((20 + 2) / 12)
    assert pooled_tau([], []) == 0.0


def test_fit_policy_learns_tau_from_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=gen) * torch.linspace(0.5, 3, 10) + 2.0  # unstandardised on purpose
    z = x[:, :3].sub(2.0).div(torch.tensor([0.5, 0.78, 1.06]))  # standardised first three features
    taus = 1.0 + torch.sigmoid(z) * torch.tensor([1.0, 2.0, 3.0])  # tau at each size rises with its own feature
    config = BlockPolicyConfig(candidate_block_sizes=[2, 4, 8], input_size=10, hidden_size=64, target_hidden_size=6)
    args = PolicyTrainingArguments(labels="", output_dir="", epochs=300, learning_rate=1e-2)
    policy = fit_policy(config, x[:450], taus[:450], args)
    assert not policy.training
    with torch.no_grad():
        predicted = policy(x[450:])
    assert (predicted >= 1).all()
    constant_error = (taus[450:] - taus[:450].mean(0)).abs().mean()
    assert (predicted - taus[450:]).abs().mean() < constant_error / 3
    agreement = (predicted.argmax(-1) == taus[450:].argmax(-1)).float().mean().item()
    assert agreement > 0.85, agreement


# ----------------------------------------------------------------------------------------------- the choice


def test_block_sizes_for_batch_without_costs_takes_each_rows_tau_best():
    tau = torch.tensor([[1.2, 1.5, 1.4], [2.0, 2.0, 1.0], [1.1, 1.2, 3.0]])
    assert block_sizes_for_batch(tau, [2, 4, 8], None).tolist() == [4, 2, 8]  # tie -> the smaller
    # candidates in any order: the answer is the same sizes
    assert block_sizes_for_batch(tau[:, [2, 0, 1]], [8, 2, 4], None).tolist() == [4, 2, 8]


def test_block_sizes_for_batch_with_costs_maximises_tokens_per_second():
    tau = torch.tensor([[1.3, 1.6, 1.7]])
    # batch 1: tau / cost = 1.3/1.0, 1.6/1.1, 1.7/1.5 -> 4; plain (1/0.95 = 1.05) loses
    assert block_sizes_for_batch(tau, [2, 4, 8], {1: 0.95, 2: 1.0, 4: 1.1, 8: 1.5}).tolist() == [4]
    # a plain step much cheaper than any block: no drafting at all
    assert block_sizes_for_batch(tau, [2, 4, 8], {1: 0.5, 2: 1.0, 4: 1.1, 8: 1.5}).tolist() == [1]
    # without a cost for size 1, plain decoding is not an option
    assert block_sizes_for_batch(tau, [2, 4, 8], {2: 1.0, 4: 1.1, 8: 1.5}).tolist() == [4]
    # a batch shares one verify size B: rows = (1.3, 1.6, 1.7) and (2.0, 1.5, 1.2); sums at B = 2, 4, 8: 3.3, 3.6,
    # 3.7 -> per cost 3.3, 3.27, 2.47 -> B = 2 for both, though row 0 alone would take 4
    tau = torch.tensor([[1.3, 1.6, 1.7], [2.0, 1.5, 1.2]])
    assert block_sizes_for_batch(tau, [2, 4, 8], {1: 0.95, 2: 1.0, 4: 1.1, 8: 1.5}).tolist() == [2, 2]
    # B = 8 when it pays: each row then takes its tau-best size up to 8
    tau = torch.tensor([[1.3, 1.6, 4.0], [2.0, 1.5, 1.2]])
    assert block_sizes_for_batch(tau, [2, 4, 8], {1: 0.95, 2: 1.0, 4: 1.1, 8: 1.5}).tolist() == [8, 2]


def test_step_costs_are_looked_up_at_the_nearest_batch_size(setup):
    target, drafter, _ = setup
    table = {1: {2: 1.0, 3: 1.0}, 4: {2: 2.0, 3: 2.0}, 16: {2: 4.0, 3: 4.0}}
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2, 3], step_costs=table)
    nearest = {1: 1, 2: 1, 3: 4, 4: 4, 8: 4, 9: 16, 64: 16}  # log scale, the smaller on ties
    for batch_size, tabled in nearest.items():
        assert policy.step_costs_for(batch_size) == {"2": table[tabled][2], "3": table[tabled][3]}
    other = random_policy(target, drafter, candidates=(2, 3))
    assert other.step_costs_for(4) is None
    other.set_step_costs(table)  # new hardware, same predictions
    assert other.step_costs_for(8) == policy.step_costs_for(8)
    with pytest.raises(ValueError, match="missing \\['3'\\]"):
        other.set_step_costs({1: {2: 1.0}})
    other.set_step_costs(None)
    assert other.step_costs_for(4) is None
    # the table survives a save/load round trip (JSON string keys)
    assert json.loads(policy.config.to_json_string())["step_costs"]["16"] == {"2": 4.0, "3": 4.0}


def test_step_costs_of_another_device_type_are_not_used(setup, tmp_path, caplog):
    """A cost table holds on the device type it was measured on; elsewhere the policy decides by predicted tau and
    says so. Tables without a device (saved before it was recorded) apply everywhere."""
    target, drafter, _ = setup
    policy = random_policy(target, drafter, candidates=(2, 3))
    prefill = random_prefill(batch=4)
    tau_best = policy.choose_block_sizes(prefill)
    plain_pays = {4: {1: 1.0, 2: 100.0, 3: 100.0}}  # drafting never pays: block size 1 for every row
    for device in (None, "cpu"):
        policy.set_step_costs(plain_pays, device)
        assert policy.config.step_costs_device == device
        assert policy.choose_block_sizes(prefill).tolist() == [1] * 4
    policy.set_step_costs(plain_pays, "cuda")
    with caplog.at_level("WARNING"):
        assert torch.equal(policy.choose_block_sizes(prefill), tau_best)
    assert "measured on cuda, but the target runs on cpu" in caplog.text
    policy.save_pretrained(tmp_path)
    assert BlockPolicy.from_pretrained(tmp_path).config.step_costs_device == "cuda"
    policy.set_step_costs(None, "cuda")  # no table, no device
    assert policy.config.step_costs_device is None


def test_a_machine_with_its_own_step_costs_decides_by_them(setup, tmp_path, caplog):
    """Machines of one device type rank block sizes differently: a policy serving on a machine it has a table for
    decides by that table, elsewhere by the default one (saying once whose it is), and keeps both when saved."""
    target, drafter, _ = setup
    policy = random_policy(target, drafter, candidates=(2, 3))
    prefill = random_prefill(batch=4)
    plain_pays = {4: {1: 1.0, 2: 100.0, 3: 100.0}}
    drafting_pays = {4: {1: 100.0, 2: 1.0, 3: 1.0}}
    here, elsewhere = machine_of("cpu"), "cpu: Another CPU, no bf16 instructions"
    policy.set_step_costs(plain_pays, "cpu")
    policy.config.step_costs_machine = elsewhere  # as train-policy records it from the first cost file
    with caplog.at_level("WARNING"):
        assert policy.choose_block_sizes(prefill).tolist() == [1] * 4  # the default table: another machine's
    assert f"measured on another machine ({elsewhere}; this is {here})" in caplog.text
    policy.set_step_costs(drafting_pays, machine=here)
    assert policy.config.step_costs_machine == elsewhere  # the default table is left as it was
    chosen = policy.choose_block_sizes(prefill).tolist()
    assert 1 not in chosen and set(chosen) <= {2, 3}
    assert policy.step_costs_for(4) == {"1": 1.0, "2": 100.0, "3": 100.0}  # the default, for reports
    policy.save_pretrained(tmp_path)
    loaded = BlockPolicy.from_pretrained(tmp_path)
    assert loaded.config.step_costs_by_machine == {here: {"4": {"1": 100.0, "2": 1.0, "3": 1.0}}}
    assert loaded.choose_block_sizes(prefill).tolist() == chosen
    policy.set_step_costs(None, machine=here)  # removes this machine's table only
    assert policy.choose_block_sizes(prefill).tolist() == [1] * 4
    with pytest.raises(ValueError, match="does not name a machine as `blockpilot_hf.hardware.machine_of"):
        policy.set_step_costs(drafting_pays, machine="AMD EPYC")
    with pytest.raises(ValueError, match="not the device type of machine"):
        policy.set_step_costs(drafting_pays, "cuda", machine=here)
    with pytest.raises(ValueError, match="missing \\['3'\\]"):
        policy.set_step_costs({1: {2: 1.0}}, machine=here)


@pytest.mark.parametrize(
    "table, message",
    [
        ({1: {2: 1.0}}, r"every block size the policy can choose \['2', '3'\]; missing \['3'\]"),
        ({1: {2: 1.0, 3: 0.0}}, "positive cost"),
        ({1: 0.5}, "must map batch sizes"),
        ({}, "step_costs is empty"),
    ],
)
def test_bad_step_costs_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        BlockPolicyConfig(candidate_block_sizes=[2, 3], step_costs=table)


def test_a_classifier_policy_from_an_earlier_version_is_refused(tmp_path, setup):
    target, drafter, _ = setup
    policy = random_policy(target, drafter)
    policy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["label_objective"] = "throughput"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved by an earlier blockpilot-hf as a classifier.*blockpilot train-policy"):
        BlockPolicy.from_pretrained(tmp_path)


def synthetic_labels(path, n, seed, hidden=8):
    """Rows whose best block size (among 2, 4, 6) is decided by the sign pattern of the first two features."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        f = torch.randn(hidden + 4, generator=gen)
        best = 0 if f[0] < 0 else (1 if f[1] < 0 else 2)
        taus = {b: 1.5 + (1.0 if k == best else 0.2 * k) for k, b in enumerate((2, 4, 6))}
        rows.append(label_row(f"s{seed}/{i}", taus, {2: 20, 4: 12, 6: 9}, f.tolist()))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_train_policy_from_files_writes_everything(tmp_path, setup):
    target, drafter, ids = setup
    synthetic_labels(tmp_path / "labels.jsonl", 40, seed=0, hidden=32)
    synthetic_labels(tmp_path / "eval.jsonl", 12, seed=1, hidden=32)
    drafter_dir = tmp_path / "drafter"
    make_drafter(target, block_size=4).save_pretrained(drafter_dir)
    out = tmp_path / "policy"
    args = PolicyTrainingArguments(labels=str(tmp_path / "labels.jsonl"), eval_labels=str(tmp_path / "eval.jsonl"),
                                   output_dir=str(out), epochs=60, hidden_size=32)
    policy, report = train_policy_from_files(args, target_name="tiny-target", drafter_path=str(drafter_dir))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "training_report.json", "observations.png", "eval_observations.png"} <= names
    assert (out / "observations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["train_prompts"] == 30 and saved["heldout"]["prompts"] == 10 and saved["eval"]["prompts"] == 12
    for part in ("heldout", "eval"):
        assert set(saved[part]["tau_fixed"]) == {"2", "4", "6"}
        assert saved[part]["tau_oracle"] >= max(saved[part]["tau_fixed"].values()) - 1e-9
    config = json.loads((out / "config.json").read_text())
    assert config["candidate_block_sizes"] == [2, 4, 6]
    assert config["drafter_block_size"] == 4 and config["target_vocab_size"] == VOCAB and config["target_hidden_size"] == 32
    assert config["target_name_or_path"] == "tiny-target"
    # the saved policy drives generate on the target it was made for
    loaded = BlockPolicy.from_pretrained(out)
    result = target.generate(ids, assistant_model=drafter, block_policy=loaded, max_new_tokens=6, return_dict_in_generate=True)
    assert result.block_sizes[0] in (2, 4, 6)


def test_train_policy_without_drafter_is_usable(tmp_path, setup):
    """Without `drafter_path` the vocabulary is unknown; the policy must still serve a target of its hidden size."""
    target, drafter, ids = setup
    synthetic_labels(tmp_path / "labels.jsonl", 8, seed=2, hidden=32)
    args = PolicyTrainingArguments(labels=str(tmp_path / "labels.jsonl"), output_dir=str(tmp_path / "p"), epochs=3,
                                   hidden_size=8)
    policy, _ = train_policy_from_files(args)
    assert policy.config.target_vocab_size is None and policy.config.drafter_block_size is None
    result = target.generate(ids, assistant_model=drafter, block_policy=policy, max_new_tokens=6, return_dict_in_generate=True)
    assert result.block_sizes[0] in (2, 4, 6)


def test_train_policy_without_matplotlib_still_saves_the_policy_and_the_numbers(tmp_path, monkeypatch):
    """GPU machines may lack matplotlib: the observations lose their PNG, not their numbers."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    synthetic_labels(tmp_path / "labels.jsonl", 8, seed=3, hidden=32)
    args = PolicyTrainingArguments(labels=str(tmp_path / "labels.jsonl"), output_dir=str(tmp_path / "p"), epochs=3,
                                   hidden_size=8)
    _, report = train_policy_from_files(args)
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert {"config.json", "model.safetensors", "training_report.json"} <= names and "observations.png" not in names
    assert sum(report["observations"]["best_histogram"].values()) == 8


def test_a_policy_trained_at_two_temperatures_reads_the_requests(tmp_path, setup):
    """Greedy labels where long blocks pay and sampled ones (same prompts) where they do not: one policy learns both
    and picks by the request's temperature, held inside the range it learnt; prompts stay on one side of the split."""
    target, drafter, ids = setup
    greedy = synthetic_labels(tmp_path / "greedy.jsonl", 40, seed=3, hidden=32)
    sampled = []
    for row in greedy:
        taus = {2: 1.8, 4: 1.2, 6: 1.05}  # a sample rarely equals the argmax proposals: short blocks
        sampled.append({**label_row(row["prompt_id"], taus, features=row["summary_features"]), "temperature": 1.0})
    (tmp_path / "sampled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sampled))
    for row in greedy:
        row["tau"] = {"2": 1.3, "4": 2.2, "6": 3.5}  # greedy: the longest block is best for every prompt
    (tmp_path / "greedy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in greedy))
    drafter_dir = tmp_path / "drafter"
    make_drafter(target, block_size=4).save_pretrained(drafter_dir)
    args = PolicyTrainingArguments(labels=f"{tmp_path / 'greedy.jsonl'},{tmp_path / 'sampled.jsonl'}",
                                   output_dir=str(tmp_path / "policy"), epochs=200, head_epochs=1000, hidden_size=32)
    policy, report = train_policy_from_files(args, drafter_path=str(drafter_dir))
    assert policy.config.label_temperatures == [0.0, 1.0] and policy.config.input_size == 32 + 4
    assert report["train_prompts"] == 30
    assert report["heldout"]["prompts"] == report["heldout_T1"]["prompts"] == 10
    assert report["heldout"]["chosen_histogram"]["6"] == 10 and report["heldout_T1"]["chosen_histogram"]["2"] == 10

    loaded = BlockPolicy.from_pretrained(tmp_path / "policy")
    def chosen(**sampling):
        out = target.generate(ids, assistant_model=drafter, block_policy=loaded, max_new_tokens=4,
                              return_dict_in_generate=True, **sampling)
        return out.block_sizes[0]

    assert chosen(do_sample=False) == 6
    assert chosen(do_sample=True, temperature=1.0) == 2
    assert chosen(do_sample=True) == 2  # sampling without a temperature samples at 1
    # between the labelled temperatures the predictions are interpolated; beyond them, the nearest one's
    features = loaded.features(random_prefill(batch=3, hidden=32))
    greedy, hot = loaded(features, 0.0), loaded(features, 1.0)
    assert (greedy[:, 2] > hot[:, 2] + 1).all()  # tau at size 6: high when greedy, low at T = 1
    torch.testing.assert_close(loaded(features, 0.25), 0.75 * greedy + 0.25 * hot)
    torch.testing.assert_close(loaded(features, torch.tensor([0.0, 3.0, 0.5])),
                               torch.stack([greedy[0], hot[1], (greedy[2] + hot[2]) / 2]))
    torch.testing.assert_close(loaded(features), greedy)  # no temperature: greedy
    # the sampled labels do not move the greedy policy: it is the one the greedy labels alone make
    args.labels, args.output_dir = str(tmp_path / "greedy.jsonl"), str(tmp_path / "greedy_policy")
    greedy_only, _ = train_policy_from_files(args, drafter_path=str(drafter_dir))
    torch.testing.assert_close(greedy_only(features), greedy, rtol=1e-5, atol=1e-5)
    assert len(greedy_only.temperature_heads) == 0 and len(loaded.temperature_heads) == 1


def test_temperature_weights_interpolate_on_an_uneven_grid():
    from blockpilot_hf.modeling_policy import temperature_weights

    weights = temperature_weights([0.0, 0.7, 1.0], torch.tensor([0.0, 0.35, 0.7, 0.85, 1.0, 2.0, -1.0]))
    expected = [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    assert temperature_weights([0.0], torch.tensor([0.5])).tolist() == [[1.0]]


def test_split_keeps_each_prompt_on_one_side_at_every_temperature():
    from blockpilot_hf.training.policy import split_rows

    rows = [label_row(f"p{i}", {2: 1.5}) for i in range(20)]
    rows += [{**label_row(f"p{i}", {2: 1.2}), "temperature": 1.0} for i in range(0, 20, 2)]
    train, heldout = split_rows(rows, 0.25, seed=0)
    assert len({r["prompt_id"] for r in heldout}) == 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in heldout}
    assert len(train) + len(heldout) == 30
    # one temperature only: the split of earlier versions (sorted ids, shuffled, the first quarter held out)
    greedy_only = rows[:20]
    expected = sorted(greedy_only, key=lambda r: r["prompt_id"])
    __import__("random").Random(0).shuffle(expected)
    assert split_rows(greedy_only, 0.25, seed=0)[1] == expected[:5]


def test_a_greedy_only_policy_warns_when_the_request_samples(setup, caplog):
    target, drafter, ids = setup
    policy = random_policy(target, drafter, candidates=(2, 3))
    assert policy.config.label_temperatures == [0.0]
    with caplog.at_level("WARNING"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, do_sample=False, max_new_tokens=3)
    assert "greedy labels only" not in caplog.text
    with caplog.at_level("WARNING"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, do_sample=True, temperature=0.77,
                        max_new_tokens=3)
    assert "learnt from greedy labels only, but the request samples (temperature 0.77)" in caplog.text
    assert "collect-labels --temperature" in caplog.text
    # a policy with sampled labels warns only outside the temperatures it learnt
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2, 3], hidden_size=16,
                                     label_temperatures=[0.0, 1.0]).eval()
    caplog.clear()
    with caplog.at_level("WARNING"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, do_sample=True, temperature=0.6,
                        max_new_tokens=3)
        assert caplog.text == ""
        target.generate(ids, assistant_model=drafter, block_policy=policy, do_sample=True, temperature=1.3,
                        max_new_tokens=3)
    assert "temperatures [0.0, 1.0]; the request's (1.3) is outside them" in caplog.text


def test_label_temperatures_are_checked():
    with pytest.raises(ValueError, match="must be >= 0"):
        BlockPolicyConfig(candidate_block_sizes=[2, 3], label_temperatures=[0.0, -1.0])
    assert BlockPolicyConfig(candidate_block_sizes=[2]).label_temperatures == [0.0]


def test_train_policy_input_errors(tmp_path):
    labels = tmp_path / "labels.jsonl"
    synthetic_labels(labels, 3, seed=0)
    with pytest.raises(ValueError, match="has 3 labelled prompts"):
        train_policy_from_files(PolicyTrainingArguments(labels=str(labels), output_dir=str(tmp_path / "p")))
    synthetic_labels(labels, 8, seed=0)
    with pytest.raises(ValueError, match=r"no tau for block sizes \[3\]"):
        train_policy_from_files(
            PolicyTrainingArguments(labels=str(labels), output_dir=str(tmp_path / "p"), candidate_block_sizes=[2, 3])
        )
    with pytest.raises(ValueError, match="needs --cost-file"):
        train_policy_from_files(
            PolicyTrainingArguments(labels=str(labels), output_dir=str(tmp_path / "p"), objective="throughput")
        )
    assert len(read_jsonl(labels)) == 8


def test_load_step_costs_reads_tables_and_flat_batch1_files(tmp_path):
    nested, flat = tmp_path / "nested.json", tmp_path / "flat.json"
    nested.write_text(json.dumps({"1": {"1": 0.04, "2": 0.05}, "16": {"1": 0.1, "2": 0.16}}))
    flat.write_text(json.dumps({"2": 0.05, "4": 0.06}))
    assert load_step_costs(str(nested)) == {1: {"1": 0.04, "2": 0.05}, 16: {"1": 0.1, "2": 0.16}}
    assert load_step_costs(str(flat)) == {1: {"2": 0.05, "4": 0.06}}
    assert step_costs_device(str(nested)) is None  # written before the device was recorded
    tagged = tmp_path / "tagged.json"
    tagged.write_text(json.dumps({"device": "cuda", "1": {"1": 0.04, "2": 0.05}}))
    assert load_step_costs(str(tagged)) == {1: {"1": 0.04, "2": 0.05}} and step_costs_device(str(tagged)) == "cuda"
    with_copy = tmp_path / "copy.json"
    with_copy.write_text(json.dumps({"1": {"1": 0.04, "2": 0.05, "2+5": 0.07, "1+5": 0.06}}))
    assert load_step_costs(str(with_copy)) == {1: {"1": 0.04, "2": 0.05, "2+5": 0.07, "1+5": 0.06}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"2x5": 0.07}}))
    with pytest.raises(ValueError, match="'2x5' is not a block size"):
        load_step_costs(str(bad))
    assert step_costs_machine(str(tagged)) is None
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"device": "cpu", "machine": "cpu: AMD EPYC, avx512_bf16", "1": {"1": 0.04}}))
    assert load_step_costs(str(named)) == {1: {"1": 0.04}}
    assert step_costs_machine(str(named)) == "cpu: AMD EPYC, avx512_bf16"


def test_cost_files_of_several_machines(tmp_path):
    arms = [Arm(2)]

    def cost_file(name, machine, seconds):
        path = tmp_path / name
        where = {"device": "cpu", **({"machine": machine} if machine else {})}
        path.write_text(json.dumps({**where, "1": {"1": 0.04, "2": seconds}}))
        return str(path)

    xeon = cost_file("xeon.json", "cpu: Xeon, amx_bf16", 0.05)
    epyc = cost_file("epyc.json", "cpu: EPYC, avx512_bf16", 0.06)
    fields = read_cost_files(f"{xeon},{epyc}", arms)
    assert fields == {
        "step_costs": {1: {"1": 0.04, "2": 0.05}},
        "step_costs_device": "cpu",
        "step_costs_machine": "cpu: Xeon, amx_bf16",
        "step_costs_by_machine": {"cpu: EPYC, avx512_bf16": {1: {"1": 0.04, "2": 0.06}}},
    }
    config = BlockPolicyConfig(candidate_block_sizes=[2], **fields)
    assert config.step_costs_by_machine == {"cpu: EPYC, avx512_bf16": {"1": {"1": 0.04, "2": 0.06}}}
    same_machine = cost_file("xeon_again.json", "cpu: Xeon, amx_bf16", 0.05)
    unnamed = cost_file("old.json", None, 0.07)
    for second in (same_machine, unnamed):
        with pytest.raises(ValueError, match="does not name a machine of its own"):
            read_cost_files(f"{xeon},{second}", arms)
    with pytest.raises(ValueError, match=r"missing \['4'\]"):
        read_cost_files(f"{xeon},{epyc}", [Arm(2), Arm(4)])
    # a folder stands for its tables (not the breakdowns bench writes beside them), each file once
    folder = tmp_path / "by_machine"
    folder.mkdir()
    for name in ("xeon.json", "epyc.json"):
        (folder / name).write_text((tmp_path / name).read_text())
    (folder / "epyc.breakdown.json").write_text("{}")
    default = str(folder / "xeon.json")
    assert cost_file_paths(f"{default},{folder}") == [default, str(folder / "epyc.json")]
    assert read_cost_files(f"{default},{folder}", arms) == fields
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no step-cost tables; write one there with `blockpilot bench"):
        read_cost_files(str(empty), arms)


def test_throughput_policy_keeps_its_cost_table_and_decides_by_batch_size(tmp_path, setup):
    """Costs where drafting pays at batch 1 but a plain step wins at batch 4: the saved policy drafts alone and
    decodes plainly in a batch, and generate stays lossless either way."""
    target, drafter, ids = setup
    synthetic_labels(tmp_path / "labels.jsonl", 40, seed=0, hidden=32)
    costs = {"1": {"1": 1.0, "2": 1.0, "4": 1.0, "6": 1.0}, "4": {"1": 1.0, "2": 4.0, "4": 5.0, "6": 6.0}}
    (tmp_path / "costs.json").write_text(json.dumps({"device": "cpu", **costs}))  # as `blockpilot bench` writes it
    args = PolicyTrainingArguments(labels=str(tmp_path / "labels.jsonl"), output_dir=str(tmp_path / "p"), epochs=60,
                                   hidden_size=32, objective="throughput", cost_file=str(tmp_path / "costs.json"))
    _, report = train_policy_from_files(args)
    loaded = BlockPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.step_costs == costs and loaded.config.step_costs_device == "cpu"
    heldout = report["heldout"]
    assert set(heldout["time_fixed_s"]) == {"1", "2", "4", "6"} and heldout["time_oracle_s"] <= heldout["time_policy_s"]
    assert heldout["batch_choices"]["4"] == {"1": 8}  # two batches of 4 out of 10 held-out rows
    assert "1" not in heldout["batch_choices"]["1"]  # every synthetic tau beats a plain step at equal cost
    batch = make_prompt(4, length=6, batch=4)
    plain = target.generate(batch, do_sample=False, max_new_tokens=N_NEW)
    result = target.generate(batch, assistant_model=drafter, block_policy=loaded, do_sample=False, max_new_tokens=N_NEW,
                             return_dict_in_generate=True)
    assert result.block_sizes == [1, 1, 1, 1] and torch.equal(result.sequences, plain)
    single = target.generate(ids, assistant_model=drafter, block_policy=loaded, max_new_tokens=N_NEW,
                             return_dict_in_generate=True)
    assert single.block_sizes[0] in (2, 4, 6)


# ----------------------------------------------------------------------------------------------- the copy chain


def test_arms_and_their_keys():
    assert [a.key for a in policy_arms([2, 4], 5)] == ["2", "4", "1+5", "2+5", "4+5"]
    assert [a.key for a in policy_arms([2, 4])] == ["2", "4"]
    assert Arm.from_key("4+5") == Arm(4, 5) and Arm.from_key(4) == Arm(4) == Arm.from_key("4") and Arm(4, 0).key == "4"
    for bad in ("0", "4+", "4+0", "x", "4+-1", "2x5"):
        with pytest.raises(ValueError, match="is not a block size"):
            Arm.from_key(bad)
    with pytest.raises(ValueError, match="copy_tokens=-1 must be a whole number"):
        BlockPolicyConfig(candidate_block_sizes=[2], copy_tokens=-1)


COPY_ARMS = policy_arms([2, 4], 5)  # 2, 4, 1+5, 2+5, 4+5
CHEAP_COPY = {"1": 1.0, "2": 1.1, "4": 1.3, "1+5": 1.2, "2+5": 1.4, "4+5": 1.6}
DEAR_COPY = {**CHEAP_COPY, "1+5": 3.0, "2+5": 3.0, "4+5": 3.0}


def test_decide_for_batch_switches_the_copy_chain_on_where_it_pays():
    tau = torch.tensor([[1.3, 1.5, 1.2, 1.8, 2.1]])
    # without copying: 1/1.0, 1.3/1.1, 1.5/1.3 -> 2 (1.18); copying: 1.2/1.2, 1.8/1.4, 2.1/1.6 -> 4+5 (1.31)
    sizes, copy = decide_for_batch(tau, COPY_ARMS, CHEAP_COPY)
    assert (sizes.tolist(), copy) == ([4], 5)
    sizes, copy = decide_for_batch(tau, COPY_ARMS, DEAR_COPY)
    assert (sizes.tolist(), copy) == ([2], 0)
    # the request fixes the setting: off (0) or on (any length: the policy's own chain's predictions)
    sizes, copy = decide_for_batch(tau, COPY_ARMS, CHEAP_COPY, copy_tokens=0)
    assert (sizes.tolist(), copy) == ([2], 0)
    sizes, copy = decide_for_batch(tau, COPY_ARMS, DEAR_COPY, copy_tokens=3)
    assert (sizes.tolist(), copy) == ([4], 5)
    # copying alone (block size 1 + the chain) where the drafter adds nothing
    sizes, copy = decide_for_batch(torch.tensor([[1.05, 1.05, 2.0, 2.05, 2.05]]), COPY_ARMS, CHEAP_COPY)
    assert (sizes.tolist(), copy) == ([1], 5)
    # equal tokens per second: the chain stays off
    tied = {key: 1.0 for key in CHEAP_COPY} | {"1": 10.0}
    sizes, copy = decide_for_batch(torch.tensor([[2.0, 1.0, 2.0, 1.0, 1.0]]), COPY_ARMS, tied)
    assert (sizes.tolist(), copy) == ([2], 0)
    # a batch copies or does not as a whole: here the sum of the rows' best tau is larger without (3.5 vs 3.4)
    tau = torch.tensor([[1.3, 1.5, 1.2, 1.8, 2.1], [2.0, 1.0, 1.1, 1.2, 1.3]])
    sizes, copy = decide_for_batch(tau, COPY_ARMS)
    assert (sizes.tolist(), copy) == ([4, 2], 0)
    # a policy without a copy chain never copies, whatever the request says
    sizes, copy = decide_for_batch(tau[:, :2], policy_arms([2, 4]), None, copy_tokens=5)
    assert (sizes.tolist(), copy) == ([4, 2], 0)


def test_policy_with_a_copy_chain_chooses_it_at_generate_and_stays_lossless(setup):
    target, drafter, _ = setup
    torch.manual_seed(0)
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2, 3], copy_tokens=3, hidden_size=16).eval()
    assert [a.key for a in policy.config.arms] == ["2", "3", "1+3", "2+3", "3+3"] and policy.copy_tokens == 3
    assert policy.tau_head.out_features == 5
    costs = {"1": 1.0, "2": 1.0, "3": 1.0}
    cheap = {1: {**costs, "1+3": 0.01, "2+3": 0.01, "3+3": 0.01}}
    dear = {1: {**costs, "1+3": 100.0, "2+3": 100.0, "3+3": 100.0}}
    batch = make_prompt(5, length=6, batch=3)
    plain = target.generate(batch, do_sample=False, max_new_tokens=N_NEW)

    def run(**kwargs):
        out = target.generate(batch, assistant_model=drafter, block_policy=policy, do_sample=False,
                              max_new_tokens=N_NEW, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, plain), kwargs
        return out.copy_tokens

    policy.set_step_costs(cheap, "cpu")
    assert run() == 3
    assert run(prompt_lookup_num_tokens=0) == 0  # the request keeps the chain off
    policy.set_step_costs(dear, "cpu")
    assert run() == 0
    assert run(prompt_lookup_num_tokens=2) == 2  # the request's chain, whatever the policy would choose
    sizes, copy = policy.choose_block_sizes_and_copy(random_prefill(batch=3))
    assert copy == 0 and torch.equal(sizes, policy.choose_block_sizes(random_prefill(batch=3)))
    # a policy of an earlier version (no copy chain in its config) loads and never copies
    plain_policy = random_policy(target, drafter, candidates=(2, 3))
    out = target.generate(batch, assistant_model=drafter, block_policy=plain_policy, do_sample=False,
                          max_new_tokens=N_NEW, return_dict_in_generate=True)
    assert out.copy_tokens == 0 and torch.equal(out.sequences, plain)


def test_a_policy_chain_longer_than_the_drafter_allows_is_refused(setup):
    target, drafter, ids = setup
    too_long = drafter.config.max_block_size + 1
    policy = BlockPolicy.from_target(target, drafter=drafter, candidate_block_sizes=[2], copy_tokens=too_long, hidden_size=8)
    policy.set_step_costs({1: {"2": 1.0, **{f"{b}+{too_long}": 0.001 for b in (1, 2)}}}, "cpu")
    with pytest.raises(ValueError, match=f"copy chain of {too_long} tokens, more than the drafter's max_block_size"):
        target.generate(ids, assistant_model=drafter, block_policy=policy, max_new_tokens=4)


def copy_label_row(pid, taus: dict, copy_taus: dict, features=None, copy_tokens=5, new_tokens=100):
    row = label_row(pid, taus, {b: round(new_tokens / t) for b, t in taus.items()}, features)
    row.update(copy_tokens=copy_tokens, tau_copy={str(b): t for b, t in copy_taus.items()},
               steps_copy={str(b): round(new_tokens / t) for b, t in copy_taus.items()})
    return row


def test_label_arms_read_the_copy_chain_of_the_labels():
    rows = [copy_label_row("a", {2: 1.5, 4: 1.6}, {1: 1.4, 2: 1.9, 4: 2.0}), copy_label_row("b", {2: 1.2, 4: 1.3}, {1: 1.1, 2: 1.4, 4: 1.5})]
    assert [a.key for a in label_arms(rows)] == ["2", "4", "1+5", "2+5", "4+5"]
    assert [a.key for a in label_arms(rows, copy_tokens=0)] == ["2", "4"]  # never copy
    assert [a.key for a in label_arms([label_row("c", {2: 1.5, 4: 1.6})])] == ["2", "4"]  # labels without a chain
    assert row_tau(rows[0], Arm(2, 5)) == 1.9 and row_tau(rows[0], Arm(1, 5)) == 1.4 and row_tau(rows[0], Arm(1)) == 1.0
    with pytest.raises(ValueError, match="every label row collected with it.*--copy-tokens 5"):
        label_arms([*rows, label_row("c", {2: 1.5, 4: 1.6})])
    with pytest.raises(ValueError, match="'c' has no labels with a 5-token copy chain"):
        row_tau(label_row("c", {2: 1.5, 4: 1.6}), Arm(2, 5))
    # the best arm: ties go to no chain, then to the smaller size
    tied = copy_label_row("t", {2: 2.0, 4: 2.0}, {1: 2.0, 2: 2.0, 4: 2.0})
    assert best_arms([tied], list(reversed(label_arms(rows)))) == [Arm(2)]


def synthetic_copy_labels(path, n, seed, hidden=4):
    """Rows where the first feature's sign says whether copying pays (a repetitive answer) or adds nothing."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        f = torch.randn(hidden + 4, generator=gen)
        copies = bool(f[0] > 0)
        taus = {2: 1.6, 4: 1.8}
        copy_taus = {1: 3.0, 2: 3.2, 4: 3.4} if copies else {1: 1.0, 2: 1.6, 4: 1.8}
        rows.append(copy_label_row(f"c{seed}/{i}", taus, copy_taus, f.tolist()))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_train_policy_learns_when_copying_pays(tmp_path, setup):
    target, drafter, ids = setup
    synthetic_copy_labels(tmp_path / "labels.jsonl", 120, seed=0)
    synthetic_copy_labels(tmp_path / "eval.jsonl", 20, seed=1)
    # a copy chain costs 30 % more per step: it pays for the repetitive rows (3.4 / 1.3) and not for the others
    costs = {"1": {"1": 1.0, "2": 1.0, "4": 1.0, "1+5": 1.3, "2+5": 1.3, "4+5": 1.3}}
    (tmp_path / "costs.json").write_text(json.dumps({"device": "cpu", **costs}))
    args = PolicyTrainingArguments(labels=str(tmp_path / "labels.jsonl"), eval_labels=str(tmp_path / "eval.jsonl"),
                                   output_dir=str(tmp_path / "p"), epochs=200, learning_rate=1e-2, hidden_size=32, objective="throughput",
                                   cost_file=str(tmp_path / "costs.json"))
    policy, report = train_policy_from_files(args)
    assert policy.config.copy_tokens == 5 and BlockPolicy.from_pretrained(tmp_path / "p").config.copy_tokens == 5
    ev = report["eval"]
    assert set(ev["tau_fixed"]) == {"2", "4", "1+5", "2+5", "4+5"}
    assert set(ev["time_fixed_s"]) == {"1", "2", "4", "1+5", "2+5", "4+5"}
    assert ev["accuracy"] >= 0.9, ev
    assert ev["time_policy_s"] < min(ev["time_fixed_s"].values())  # choosing per request beats any fixed arm
    assert set(ev["chosen_histogram"]) >= {"4", "4+5"} and ev["chosen_histogram"]["4+5"] > 0 and ev["chosen_histogram"]["4"] > 0
    # and without a copy-chain cost in the file it says which arms are missing
    (tmp_path / "costs.json").write_text(json.dumps({"device": "cpu", "1": {"1": 1.0, "2": 1.0, "4": 1.0}}))
    with pytest.raises(ValueError, match=r"missing \['1\+5', '2\+5', '4\+5'\]"):
        train_policy_from_files(args)
    args.copy_tokens = 0  # a policy that never copies trains from the same labels
    assert train_policy_from_files(args)[0].config.copy_tokens == 0
