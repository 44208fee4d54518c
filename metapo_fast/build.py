"""Building a run: tokenizer, policy and reference models, the SFT warm-up of the embedded default,
and the train / validation / evaluation data (validation split by the reference margin)."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import MetaPOConfig
from .data import PreferenceCollator, PreferenceDataset, TokenizedPairs, build_datasets, load_preference_data
from .modeling import compute_device, last_hidden_states, lm_head_of

log = logging.getLogger(__name__)

__all__ = ["RunData", "build_tokenizer_and_model", "sft_warmup", "make_reference", "build_data", "sequence_logps_batched"]


def build_tokenizer_and_model(cfg: MetaPOConfig, device: torch.device):
    """(tokenizer, policy model). The embedded default is a tiny Llama over the character tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    m = cfg.model
    dtype = getattr(torch, m.dtype)
    if m.name_or_path is None:
        from .synthetic import build_char_tokenizer

        tok = build_char_tokenizer()
        t = m.tiny
        lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                           max_position_embeddings=t.max_position_embeddings, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=t.tie_word_embeddings)
        torch.manual_seed(cfg.train.seed)
        model = LlamaForCausalLM(lcfg).to(dtype)
        model.config._attn_implementation = _attn(m.attn_implementation)
    else:
        tok = AutoTokenizer.from_pretrained(m.tokenizer_name_or_path or m.name_or_path, revision=m.revision)
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, revision=m.revision, dtype=dtype,
                                                     attn_implementation=_attn(m.attn_implementation))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if m.use_liger_kernels:
        if device.type != "cuda":
            raise ValueError("model.use_liger_kernels=true needs a CUDA device (Liger's RMSNorm/SwiGLU are Triton kernels); "
                             f"this run is on {device}")
        from .liger import apply_liger_kernels

        log.info("Liger-Kernel modules swapped in: %s", apply_liger_kernels(model))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return tok, model.to(device)


def _attn(name: str) -> str:
    """transformers' name of an attention choice; "varlen" (padding-free packed pairs) is our own
    kernel, registered with transformers' AttentionInterface (metapo_fast.varlen)."""
    if name == "varlen":
        from .varlen import register

        return register()
    return name


def make_reference(model: nn.Module, cfg: MetaPOConfig, device: torch.device) -> Optional[nn.Module]:
    """A frozen reference model: the policy's starting point (or model.ref_name_or_path)."""
    from .losses import get_loss

    if not get_loss(cfg.loss.loss_type).needs_reference:  # config validation rejects KL features without one
        return None
    if cfg.model.ref_name_or_path:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(cfg.model.ref_name_or_path, dtype=getattr(torch, cfg.model.dtype),
                                                   attn_implementation=_attn(cfg.model.attn_implementation))
    else:
        ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref.to("cpu" if cfg.model.ref_offload_cpu else device)


def sft_warmup(model: nn.Module, tok, rows: list[dict], steps: int, lr: float, seed: int, device: torch.device,
               batch_size: int = 32, log_every: int = 50) -> list[float]:
    """Supervised warm-up on (prompt, completion) rows: produces the reference model of the
    embedded default (a policy that already prefers the right answers most of the time)."""
    if steps <= 0:
        return []
    gen = np.random.default_rng(seed)
    enc = [(tok(r["prompt"], add_special_tokens=False)["input_ids"], tok(r["completion"], add_special_tokens=False)["input_ids"])
           for r in rows]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    head = lm_head_of(model)
    losses = []
    model.train()
    for step in range(steps):
        idx = gen.choice(len(enc), size=min(batch_size, len(enc)), replace=False)
        seqs = [([bos] if bos is not None else []) + enc[i][0] + enc[i][1] + [eos] for i in idx]
        plen = [len(enc[i][0]) + (bos is not None) for i in idx]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, (s, p) in enumerate(zip(seqs, plen)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            labels[r, p - 1:len(s) - 1] = torch.tensor(s[p:])
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        h = last_hidden_states(model, ids, mask)
        logits = head(h).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("sft warm-up step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def sequence_logps_batched(model: nn.Module, ds: PreferenceDataset, collator: PreferenceCollator, device,
                           batch_size: int = 64) -> np.ndarray:
    """``(N, 2)`` float64 sums of response log-probs (chosen, rejected) of every pair of ``ds``."""
    from .fused_loss import fused_sequence_logps

    head = lm_head_of(model)
    out = np.zeros((len(ds), 2))
    was_training = model.training
    model.eval()
    for s in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        b = collator(items)
        h = last_hidden_states(model, b["input_ids"].to(device), b["attention_mask"].to(device))
        lp = fused_sequence_logps(h, head.weight.to(device), b["labels"].to(device),
                                  bias=None if head.bias is None else head.bias.to(device))
        out[s:s + len(items)] = lp.double().reshape(2, -1).t().cpu().numpy()
    model.train(was_training)
    return out


@dataclass
class RunData:
    train: PreferenceDataset
    val: PreferenceDataset
    eval: Optional[PreferenceDataset]
    collator: PreferenceCollator
    train_pairs: TokenizedPairs


def build_data(cfg: MetaPOConfig, tok, ref_model: Optional[nn.Module], device: torch.device, task=None) -> RunData:
    """Load and tokenise the data, split off validation pairs (stratified by the reference model's
    log-prob margin, math.md section 6), and build the held-out evaluation set if any."""
    d = cfg.data
    rows_train = task.train_rows if task is not None else None
    rows_eval = task.eval_rows if task is not None else None
    pairs = load_preference_data(d, tok, "train", rows=rows_train, source_name="synthetic")
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"no valid training pairs in {d.path or 'the synthetic task'}")
    collator = PreferenceCollator(tok.pad_token_id)
    margins = None
    if d.val_fraction > 0 and d.val_split == "stratified":
        if ref_model is None:
            raise ValueError("data.val_split='stratified' needs a reference model (the margin logp_ref(y_w) - logp_ref(y_l)); "
                             "use data.val_split=random with reference-free losses")
        lp = sequence_logps_batched(ref_model, PreferenceDataset(pairs), collator, compute_device(ref_model))
        margins = lp[:, 0] - lp[:, 1]
    train, val = build_datasets(pairs, margins, d)
    if task is not None and d.synthetic.clean_validation:
        from .batching import TrueLabels

        val = TrueLabels(val)
    ev = load_preference_data(d, tok, "eval", rows=rows_eval, source_name="synthetic-eval")
    return RunData(train, val, PreferenceDataset(ev) if ev is not None and len(ev) else None, collator, pairs)
