"""Draft-step cost against context length, SmolLM2-135M drafter shape (2 layers, block 16): full vs sliding (window 256).

Run: .venv/bin/python results/current/sliding_drafter/draft_step_cost.py BATCH  (median of 12 eager steps, fp32, CPU)
"""
import time, torch
from blockpilot_hf.loading import load_target
from blockpilot_hf.modeling_drafter import DFlashDrafter, choose_mask_token_id
from blockpilot_hf.decoding import DecodingWorkspace
torch.manual_seed(0)
import sys; BATCH = int(sys.argv[1])
target, tok = load_target("default", torch.float32)
mask_id = choose_mask_token_id(tok)
results = {}
for name, extra in [("full", {}), ("sliding_256", dict(layer_types=["sliding_attention"] * 2, sliding_window=256))]:
    drafter = DFlashDrafter.from_target(target, num_layers=2, block_size=16, mask_token_id=mask_id, **extra).eval()
    drafter.config.max_block_size = 16
    for context in (512, 4096):
        ws = DecodingWorkspace(target, drafter, batch_size=BATCH, capacity=context + 64, use_graphs=False)
        ws.reset(torch.ones(BATCH, context, dtype=torch.bool))
        ws.row_block_sizes.fill_(16)
        _, draft = ws.steps(16)
        features = torch.randn(BATCH, context, drafter.config.context_feature_size)
        positions = torch.arange(context)[None].expand(BATCH, -1)
        with torch.no_grad():
            draft.anchor_ids.fill_(5); draft.anchor_positions.fill_(context)
            draft.place(0, context); draft.run(features, positions, torch.tensor(0))  # prompt into the caches
            ws.slot_valid[:, context : context + 16] = True
            draft.context.copy_(features[:, :16]); draft.context_positions.copy_(positions[:, :16] + context)
            draft.anchor_positions.fill_(context + 16)
            draft.place(context, 16)
            times = []
            for _ in range(12):
                t = time.perf_counter(); draft(); times.append(time.perf_counter() - t)
        results[(name, context)] = sorted(times)[len(times) // 2]
        print(f"batch {BATCH} {name:12s} context {context:5d}: draft step {1000 * results[(name, context)]:.1f} ms", flush=True)
