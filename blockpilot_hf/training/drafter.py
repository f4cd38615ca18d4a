"""Drafter training: the DFlash recipe (SpecForge's public version) on the target's own responses.

Per sequence, up to `max_anchors` anchor positions are sampled among response tokens (without replacement, fresh
every epoch). Every anchor gives a block `[x_p, MASK...]` built by `layout.build_block_layout`, the same function
decoding uses; all blocks of a batch run in one drafter forward with a block-sparse mask (context before the anchor
plus the own block). The loss is cross-entropy at block positions 1..B-1 against `x_{p+k}`, weighted by
`exp(-(k-1)/gamma)`. The target (its embedding and LM head included) stays frozen and only provides features.
Variants the ablations compare: positions weighted by the drafter's own confidence (`loss_weighting="confidence"`,
D-PACE), the target's whole distribution as the label (`soft_targets`), draft layers started from target layers
(`init_layers_from_target`).

`training_block_sizes` trains one drafter for several block layouts, cycled step by step. A drafter trained only on
16-token blocks predicts worse in a 4-token block (its masked positions attend to each other, so the block length is
part of the input): on 16 of its own training sequences the shipped B = 16 drafter's position-1 accuracy is 0.37 in
16-token blocks, 0.29 in 4-token and 0.26 in 2-token blocks. Every step keeps the same number of block tokens
(`max_anchors * block_size`): more anchors for shorter blocks.

Two things make a step cheaper without changing what is learned: a draft vocabulary (`draft_vocab_size`: the loss
over those rows of the LM head, the step's largest product and softmax) and a `FeatureStore` (`feature_store`: the
target's features computed once for all epochs instead of a target forward per batch). The loss is taken a chunk
of rows at a time without keeping the logits (`linear_cross_entropy`), which halves a step's peak memory. Measured
sequences per hour: docs/performance.md.

Runs on CPU, one GPU, or many GPUs under `accelerate launch` (each process computes target features for its batches,
or reads them from the store the main process filled).
"""

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..configuration import check_attention_layout
from ..features import context_features
from ..layout import IGNORE_INDEX, block_labels, block_loss_weights, build_block_layout
from ..modeling_drafter import DFlashDrafter
from .data import frequent_token_ids
from .feature_store import FeatureStore, row_key
from .linear_cross_entropy import linear_cross_entropy

LOSS_WEIGHTINGS = ("decay", "confidence")
TRAINING_LOG = "training_log.json"  # in the output directory, and in each checkpoint for a resume to go on with


@dataclass
class DrafterTrainingArguments:
    output_dir: str
    block_size: int = 16
    num_layers: int = 2
    max_anchors: int = 64
    batch_size: int = 16
    epochs: int = 6
    learning_rate: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 768
    gamma: float | None = None
    # How block positions are weighted in the loss: "decay" (DFlash: exp(-(k-1)/gamma)) or "confidence" (D-PACE:
    # each position by the drafter's own chance of reaching it and what lies after it; `confidence_alpha` smooths).
    loss_weighting: str = "decay"
    confidence_alpha: float = 0.5
    # Soft targets: each block position learns the target's whole distribution there (over the draft vocabulary when
    # there is one), a cross-entropy equal to the KL divergence up to the target's entropy, instead of its one token.
    soft_targets: bool = False
    max_steps: int | None = None
    time_budget_s: float | None = None
    save_every_steps: int = 500
    # Checkpoints kept besides the newest: a resume needs one, and each holds the optimizer's state too.
    keep_checkpoints: int = 1
    log_every_steps: int = 20
    seed: int = 0
    mask_token_id: int | None = None
    target_layer_ids: list[int] | None = field(default=None)
    # A fresh drafter's layers start from these target layers (one each) instead of a random init.
    init_layers_from_target: list[int] | None = field(default=None)
    training_block_sizes: list[int] | None = field(default=None)
    # Draft layers that see only the last `sliding_window` context positions: all of them unless `layer_types` says
    # which (per layer, "sliding_attention" or "full_attention"), so that long contexts cost the drafter a window.
    sliding_window: int | None = None
    layer_types: list[str] | None = field(default=None)
    # A fresh drafter proposes only the `draft_vocab_size` most frequent response tokens of its training rows, and
    # its loss is taken over those rows of the LM head: most of a training step is that product and its softmax.
    draft_vocab_size: int | None = None
    # Where the target's context features of the training rows are kept (`FeatureStore`): computed once, read back
    # every epoch, instead of a target forward per batch.
    feature_store: str | None = None

    def __post_init__(self):
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={self.loss_weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}.")
        if not 0.0 < self.confidence_alpha <= 1.0:
            raise ValueError(f"confidence_alpha={self.confidence_alpha} must lie in (0, 1] (the paper uses 0.5).")
        if self.init_layers_from_target is not None and len(self.init_layers_from_target) != self.num_layers:
            raise ValueError(
                f"init_layers_from_target names {len(self.init_layers_from_target)} target layers for "
                f"{self.num_layers} draft layers: give one per draft layer."
            )
        layout = self.attention_layout()
        if layout:
            check_attention_layout(layout["layer_types"], self.num_layers, layout["sliding_window"])
        if any(not 2 <= b <= self.block_size for b in self.cycled_block_sizes):
            raise ValueError(
                f"training_block_sizes {self.cycled_block_sizes} must lie in [2, block_size={self.block_size}]: raise "
                "block_size (the largest block the drafter is configured for) or drop the larger sizes."
            )

    @property
    def cycled_block_sizes(self) -> list[int]:
        return self.training_block_sizes or [self.block_size]

    def attention_layout(self) -> dict:
        """The drafter config fields for its layers' attention (none for full attention everywhere)."""
        if self.sliding_window is None and self.layer_types is None:
            return {}
        return {
            "layer_types": self.layer_types or ["sliding_attention"] * self.num_layers,
            "sliding_window": self.sliding_window,
        }

    def block_size_at(self, step: int) -> tuple[int, int]:
        """`(block_size, max_anchors)` of training step `step` (0-based): sizes cycle, block tokens per step stay equal."""
        sizes = self.cycled_block_sizes
        block_size = sizes[step % len(sizes)]
        return block_size, max(1, self.max_anchors * self.block_size // block_size)


class ResponseDataset(torch.utils.data.Dataset):
    """Rows of `training.data.regenerate_responses`, truncated to `max_length`; those without 2 response tokens are
    dropped. With a `FeatureStore` holding them, items carry the target's context features too."""

    def __init__(self, rows: list[dict], max_length: int, feature_store: FeatureStore | None = None):
        self.rows = [r for r in rows if min(len(r["input_ids"]), max_length) - r["prompt_len"] >= 2]
        self.max_length = max_length
        self.feature_store = feature_store

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        item = {"input_ids": row["input_ids"][: self.max_length], "prompt_len": row["prompt_len"]}
        if self.feature_store is not None:
            item["features"] = self.feature_store.get(row_key(item["input_ids"]))
        return item


def collate_right_padded(batch: list[dict], pad_id: int = 0) -> dict:
    width = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.tensor(x["input_ids"])
        attention_mask[i, :n] = 1
        loss_mask[i, x["prompt_len"] : n] = True
    collated = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if "features" in batch[0]:
        first = batch[0]["features"]
        features = first.new_zeros(len(batch), width, first.shape[-1])
        for i, x in enumerate(batch):
            features[i, : len(x["features"])] = x["features"]
        collated["features"] = features
    return collated


def sample_anchor_positions(loss_mask: torch.Tensor, max_anchors: int, generator: torch.Generator):
    """Up to `max_anchors` anchors per sequence among positions p whose next token is a response token.

    Returns `(anchor_positions, anchor_valid)`, both `(batch, num_anchors)`; invalid slots (short sequences) point at
    position 0 and must be excluded from the loss.
    """
    # The anchor is a committed token; its block predicts p+1..: p+1 must be a response token.
    candidates = torch.zeros_like(loss_mask)
    candidates[:, :-1] = loss_mask[:, 1:]
    counts = candidates.sum(-1)
    num_anchors = int(min(max_anchors, counts.max().item()))
    positions = torch.zeros(loss_mask.shape[0], num_anchors, dtype=torch.long)
    valid = torch.zeros(loss_mask.shape[0], num_anchors, dtype=torch.bool)
    for i in range(loss_mask.shape[0]):
        where = candidates[i].nonzero().flatten()
        chosen = where[torch.randperm(len(where), generator=generator)[:num_anchors]].sort().values
        positions[i, : len(chosen)] = chosen
        valid[i, : len(chosen)] = True
    return positions, valid


def confidence_weights(confidence: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """D-PACE position weights (Eqs. 7-8 of arXiv 2605.18810) for blocks of shape `(..., B)`: with `q_k` the drafter's
    probability of the right token at position k (`confidence`) smoothed to `(1 - alpha) q_k + alpha`, position k
    weighs `sum_{m >= k} prod_{i <= m} q_i`, its chance of being reached times the accepted length it leads to.
    Positions not `valid` (the anchor, past the sequence's end) weigh 0 and end the products. Detached."""
    smoothed = torch.where(valid, (1 - alpha) * confidence.detach() + alpha, 0.0)
    smoothed[..., 0] = 1.0  # the anchor is given, not drafted
    reach = smoothed.cumprod(-1)
    reach[..., 0] = 0.0
    weights = reach.flip(-1).cumsum(-1).flip(-1)
    return torch.where(valid, weights, 0.0)


def drafter_loss(
    drafter,
    target,
    batch: dict,
    block_size: int,
    max_anchors: int,
    generator,
    gamma=None,
    config=None,
    draft_token_ids=None,
    loss_weighting: str = "decay",
    confidence_alpha: float = 0.5,
    soft_targets: bool = False,
):
    """Weighted block cross-entropy for one batch; also returns per-position accuracy and the expected acceptance.

    `drafter` may be wrapped (DDP); pass the drafter's `config` then, and its `draft_token_ids` when it has a draft
    vocabulary. The batch's `features` (from a `FeatureStore`) are used when present, else the target computes them.
    With a draft vocabulary the loss is taken over its rows of the LM head only: a label outside it can never be
    proposed, so its position teaches nothing (it still counts as a miss in the accuracy and tau).
    """
    config = config if config is not None else drafter.config
    if draft_token_ids is None:
        draft_token_ids = getattr(drafter, "draft_token_ids", None)
    input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    device = input_ids.device
    features, final_hidden = batch.get("features"), None
    if features is None:
        with torch.no_grad():
            # The base model alone: hidden states without the vocabulary-wide logits nobody reads.
            outputs = target.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            features = context_features(outputs.hidden_states, config.target_layer_ids)
            final_hidden = outputs.last_hidden_state if soft_targets else None
            del outputs
    elif soft_targets:
        # A store made for soft targets keeps the final hidden state after the context features.
        width = config.target_hidden_size
        if features.shape[-1] != (len(config.target_layer_ids) + 1) * width:
            raise ValueError(
                "Soft targets need the target's final hidden state after the context features; these stored features "
                "have none: use a feature store made with `with_final_hidden_state=True` (train-drafter --soft-targets "
                "makes one)."
            )
        features, final_hidden = features[..., :-width], features[..., -width:]
    anchors, anchor_valid = sample_anchor_positions(loss_mask.cpu(), max_anchors, generator)
    anchors, anchor_valid = anchors.to(device), anchor_valid.to(device)
    seq_len = input_ids.shape[1]
    context_positions = torch.arange(seq_len, device=device).expand(input_ids.shape[0], -1)
    layout = build_block_layout(
        anchor_ids=torch.gather(input_ids, 1, anchors),
        anchor_positions=anchors,
        block_size=block_size,
        mask_token_id=config.mask_token_id,
        context_positions=context_positions,
        context_padding_mask=attention_mask,
        sliding_window=config.sliding_window if "sliding_attention" in config.layer_types else None,
        block_sparse=True,
    )
    labels = block_labels(input_ids, anchors, block_size, loss_mask)
    labels = labels.masked_fill(~anchor_valid[:, :, None], IGNORE_INDEX)

    noise_embeds = target.get_input_embeddings()(layout.input_ids)
    hidden = drafter(
        noise_embeds=noise_embeds,
        context_hidden_states=features,
        position_ids=torch.cat([context_positions, layout.position_ids], dim=1),
        attention_mask=layout.attention_mask,
    ).last_hidden_state
    hidden = hidden.view(*labels.shape, -1)
    valid = labels != IGNORE_INDEX
    lm_head = target.get_output_embeddings()
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    targets = labels[valid]
    weights = block_loss_weights(block_size, gamma, device=device).expand_as(labels)[valid]
    if draft_token_ids is not None:
        weight, bias = weight[draft_token_ids], None if bias is None else bias[draft_token_ids]
        rows = torch.full((lm_head.weight.shape[0],), -1, dtype=torch.long, device=device)
        rows[draft_token_ids] = torch.arange(len(draft_token_ids), device=device)
        targets = rows[targets]  # -1: outside the draft vocabulary
        weights = weights * (targets >= 0)
    soft_label_hidden = None
    if soft_targets:
        # The target's distribution for x_{p+k} is its output at position p+k-1.
        sources = (anchors[:, :, None] + torch.arange(block_size, device=device) - 1).clamp(0, seq_len - 1)
        soft_label_hidden = torch.gather(
            final_hidden, 1, sources.flatten(1)[..., None].expand(-1, -1, final_hidden.shape[-1])
        ).view(*labels.shape, -1)[valid]
    # The target's head is frozen (train_drafter freezes it; callers of this function alone may not have).
    bias = None if bias is None else bias.detach()
    losses, hard_losses, predictions = linear_cross_entropy(
        hidden[valid], weight.detach(), bias, targets.clamp(min=0), soft_label_hidden
    )
    if loss_weighting == "confidence":
        # A label the drafter cannot propose (outside its vocabulary) has confidence 0: later positions are unreachable.
        confidence = torch.zeros(labels.shape, device=device)
        confidence[valid] = torch.exp(-hard_losses) * (targets >= 0)
        weights = confidence_weights(confidence, valid, confidence_alpha)[valid] * (targets >= 0)
    loss = (losses * weights).sum() / weights.sum().clamp(min=1e-6)

    with torch.no_grad():
        correct = torch.zeros_like(labels, dtype=torch.bool)
        correct[valid] = predictions == targets
        position_counts = valid.sum((0, 1)).float()
        position_accuracy = correct.sum((0, 1)).float() / position_counts.clamp(min=1)
        # Accepted drafts per block = length of the all-correct prefix after the anchor (positions 1..).
        prefix_ok = (correct[:, :, 1:] | ~valid[:, :, 1:]).int().cumprod(-1) * valid[:, :, 1:].int()
        accepted = prefix_ok.sum(-1)[anchor_valid].float()
        expected_tau = (accepted.mean() + 1).item() if accepted.numel() else 1.0
    return loss, {"position_accuracy": position_accuracy.tolist(), "tau": expected_tau}


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Delete all but the `keep` newest `step-N` checkpoints."""
    saved = sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in saved[:-keep]:
        shutil.rmtree(old)


def train_drafter(
    target,
    rows: list[dict],
    args: DrafterTrainingArguments,
    drafter: DFlashDrafter | None = None,
    accelerator: Accelerator | None = None,
    pad_token_id: int = 0,
) -> DFlashDrafter:
    """Train (or continue training) a drafter for `target` on regenerated responses; saves to `args.output_dir`.

    Checkpoints (`accelerator.save_state` and the drafter's config: each loads with `from_pretrained`) go to
    `output_dir/checkpoints/step-N`; an existing one is resumed from.
    Training stops at `epochs`, `max_steps` or `time_budget_s`, whichever comes first, and the final drafter is
    written with `save_pretrained`.
    """
    accelerator = accelerator or Accelerator()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    target.requires_grad_(False).eval()
    if drafter is None:
        drafter = DFlashDrafter.from_target(
            target,
            num_layers=args.num_layers,
            block_size=args.block_size,
            mask_token_id=args.mask_token_id,
            target_layer_ids=args.target_layer_ids,
            **args.attention_layout(),
        )
        drafter.to(torch.float32)
        if args.init_layers_from_target:
            drafter.copy_target_layers(target, args.init_layers_from_target)
        if args.draft_vocab_size:
            drafter.set_draft_vocabulary(
                frequent_token_ids(rows, args.draft_vocab_size, exclude={drafter.config.mask_token_id})
            )
    drafter.train()
    dataset = ResponseDataset(rows, args.max_length)
    if args.feature_store:
        layer_ids = drafter.config.target_layer_ids
        # The main process computes what is missing; the others then open a complete store.
        with accelerator.main_process_first():
            dataset.feature_store = FeatureStore(
                args.feature_store, target, layer_ids, args.max_length, with_final_hidden_state=args.soft_targets
            )
            dataset.feature_store.add(target.to(accelerator.device), dataset.rows)
    if len(dataset) == 0:
        raise ValueError("No training rows with at least 2 response tokens: regenerate the data first.")
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda b: collate_right_padded(b, pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    start = time.monotonic()
    progress_state = {"step": 0}

    def training_progress() -> float:
        """Fraction of the run done: by steps, or by the clock when a time budget ends the run first."""
        done = progress_state["step"] / total_steps
        if args.time_budget_s:
            done = max(done, (time.monotonic() - start) / args.time_budget_s)
        return min(done, 1.0)

    def lr_factor(_):
        # Linear warm-up then cosine decay over the run's progress, so a time-budgeted run still ends annealed.
        p = training_progress()
        if p < args.warmup_ratio:
            return max(p / args.warmup_ratio, 1e-3)
        return 0.5 * (1.0 + math.cos(math.pi * (p - args.warmup_ratio) / (1 - args.warmup_ratio)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    drafter, optimizer, loader, scheduler = accelerator.prepare(drafter, optimizer, loader, scheduler)
    target.to(accelerator.device)

    output_dir = Path(args.output_dir)
    checkpoints = output_dir / "checkpoints"
    step = 0
    latest = (
        sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if checkpoints.is_dir() else []
    )
    history, seconds_before = [], 0.0  # the log and training seconds of the steps before a resume
    if latest:
        accelerator.load_state(str(latest[-1]))
        step = int(latest[-1].name.split("-")[1])
        progress_state["step"] = step
        if (latest[-1] / TRAINING_LOG).is_file():
            kept = json.loads((latest[-1] / TRAINING_LOG).read_text())
            history, seconds_before = kept["history"], kept["seconds"]
        accelerator.print(f"resumed from {latest[-1]}")

    anchor_generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    progress = tqdm(total=total_steps, initial=step, desc="training drafter", disable=not accelerator.is_main_process)

    def training_log() -> str:
        seconds = seconds_before + time.monotonic() - start
        return json.dumps({"args": asdict(args), "steps": step, "seconds": seconds, "history": history}, indent=1)

    stop = False
    epoch = step // max(1, steps_per_epoch)
    while not stop:
        loader_iter = (
            accelerator.skip_first_batches(loader, step % steps_per_epoch) if step % steps_per_epoch else loader
        )
        for batch in loader_iter:
            block_size, max_anchors = args.block_size_at(step)
            with accelerator.accumulate(drafter), accelerator.autocast():
                loss, stats = drafter_loss(
                    drafter,
                    target,
                    batch,
                    block_size,
                    max_anchors,
                    anchor_generator,
                    args.gamma,
                    config=accelerator.unwrap_model(drafter).config,
                    draft_token_ids=getattr(accelerator.unwrap_model(drafter), "draft_token_ids", None),
                    loss_weighting=args.loss_weighting,
                    confidence_alpha=args.confidence_alpha,
                    soft_targets=args.soft_targets,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(drafter.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            progress_state["step"] = step
            progress.update(1)
            if step % args.log_every_steps == 0 or step == 1:
                record = {
                    "step": step,
                    "epoch": epoch,
                    "block_size": block_size,
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    **stats,
                }
                history.append(record)
                progress.set_postfix(
                    B=block_size,
                    loss=f"{record['loss']:.3f}",
                    tau=f"{stats['tau']:.2f}",
                    acc1=f"{stats['position_accuracy'][1]:.2f}",
                )
            if step % args.save_every_steps == 0:
                accelerator.save_state(str(checkpoints / f"step-{step}"))
                if accelerator.is_main_process:
                    # the log so far goes with the checkpoint: a resume, here or on another machine, goes on with it
                    (checkpoints / f"step-{step}" / TRAINING_LOG).write_text(training_log())
                    # and the config beside the saved weights makes the checkpoint a drafter (`from_pretrained`, any
                    # `--drafter`), as a Trainer checkpoint is a model: a long run can be measured while it trains
                    saved = accelerator.unwrap_model(drafter)
                    saved.config.architectures = [type(saved).__name__]  # as `save_pretrained` names it
                    saved.config.save_pretrained(checkpoints / f"step-{step}")
                    prune_checkpoints(checkpoints, args.keep_checkpoints + 1)
            out_of_time = args.time_budget_s is not None and time.monotonic() - start > args.time_budget_s
            # Every process must stop at the same step: the main process decides.
            decision = [step >= total_steps or out_of_time]
            broadcast_object_list(decision)
            if decision[0]:
                stop = True
                break
        epoch += 1
    progress.close()

    unwrapped = accelerator.unwrap_model(drafter)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(output_dir)

        (output_dir / TRAINING_LOG).write_text(training_log())
    accelerator.wait_for_everyone()
    return unwrapped.eval()
