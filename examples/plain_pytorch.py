"""MetaPO in your own PyTorch loop: fused loss + TemporalTracker + MetaWeightNet + MetaLearner.

    python examples/plain_pytorch.py --steps 100
"""
import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metapo_fast import MetaLearner, MetaWeightNet, TemporalTracker, fused_linear_preference_loss
from metapo_fast.config import DataConfig
from metapo_fast.data import PreferenceCollator, PreferenceDataset, load_preference_data
from metapo_fast.models.hf import last_hidden_states
from metapo_fast.data.synthetic import build_char_tokenizer, make_synthetic_task

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--K", type=int, default=10, help="meta-update interval")
args = ap.parse_args()

torch.manual_seed(0)
tok = build_char_tokenizer()
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id))
ref = copy.deepcopy(model).eval().requires_grad_(False)
task = make_synthetic_task(num_pairs=600, flip_fraction=0.3, seed=0)
pairs = load_preference_data(DataConfig(max_length=16, max_prompt_length=8), tok, rows=task.train_rows)
train, val = PreferenceDataset(pairs, range(0, 560)), PreferenceDataset(pairs, range(560, 600))
collate = PreferenceCollator(tok.pad_token_id)

tracker = TemporalTracker(len(train), alpha=0.9)                 # 24 bytes of history per pair
net = MetaWeightNet(normalize="batch_mean")                       # all weights exactly 1 at start
meta = MetaLearner(net, lr=0.003, interval=args.K, inner_lr=3e-4, start_step=args.steps // 3)  # the trainer's default start
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)


def forward(m, batch):
    return last_hidden_states(m, batch["input_ids"], batch["attention_mask"])


for step in range(1, args.steps + 1):
    batch = collate([train[i] for i in torch.randint(0, len(train), (16,)).tolist()])
    hidden = forward(model, batch)
    with torch.no_grad():
        ref_hidden = forward(ref, batch)
        stats = fused_linear_preference_loss(hidden.detach(), model.lm_head.weight, batch["labels"],
                                             ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight)
    features = tracker.update(batch["pair_ids"], stats.margins, stats.kl)  # this step's margin and KL
    weights = net(features, update_stats=True).detach()
    out = fused_linear_preference_loss(hidden, model.lm_head.weight, batch["labels"], sample_weights=weights,
                                       ref_logps=(stats.ref_chosen_logps, stats.ref_rejected_logps), compute_kl=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if meta.due(step):                                             # bilevel update of the weights on validation pairs
        meta.step(model, batch, collate([val[i] for i in range(16)]), features, ref_model=ref)
    print(f"step {step}: loss {out.loss.item():.4f} margin {stats.margins.mean().item():.4f} "
          f"weights {weights.min().item():.3f}..{weights.max().item():.3f}")
