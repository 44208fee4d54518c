"""Thin adapters around Hugging Face causal LMs: the decoder's last hidden states and the LM head,
so the fused loss replaces the head (the model's forward never returns logits in training)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

__all__ = ["decoder_of", "lm_head_of", "last_hidden_states", "pack_plan", "compute_device", "zero3_init", "hf_zero3",
           "is_zero3_partitioned", "copy_partitions", "param_bytes_on_rank"]


def decoder_of(model: nn.Module) -> nn.Module:
    """The body of a ``*ForCausalLM`` (everything but the LM head), e.g. ``LlamaForCausalLM.model``."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None:
            return dec
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and hasattr(model, prefix):
        return getattr(model, prefix)
    raise ValueError(f"cannot find the decoder of {type(model).__name__}: expected get_decoder() or base_model_prefix")


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The output projection ``(V, H)`` (+ optional bias) of a causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) to fuse the loss with")
    return head


def compute_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its parameters' device, or the device a host-resident model is
    streamed to (:func:`metapo_fast.models.offload.stream_reference`)."""
    dev = getattr(model, "_metapo_compute_device", None)
    return dev if dev is not None else next(model.parameters()).device


def pack_plan(model: nn.Module, attention_mask: Optional[torch.Tensor], device=None):
    """The :class:`~metapo_fast.models.varlen.PackPlan` of a batch when ``model`` runs packed varlen
    attention (``model.attn_implementation=varlen``), else ``None``. Pass the collator's CPU
    mask: the plan is built on the host and copied to ``device`` without a sync."""
    from .varlen import PackPlan, is_varlen

    if attention_mask is None or not is_varlen(model):
        return None
    return PackPlan.from_mask(attention_mask, device if device is not None else next(model.parameters()).device)


def last_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, plan=None, **kwargs
) -> torch.Tensor:
    """``(N, T, H)`` hidden states that the LM head would read (final norm applied).

    With packed varlen attention the ``N`` right-padded rows run as one packed row (``plan``, or
    one built from ``attention_mask``) and come back in the padded layout, zeros at padding."""
    dec = decoder_of(model)
    if plan is None:
        plan = pack_plan(model, attention_mask, input_ids.device)
    if plan is not None:
        out = dec(input_ids=plan.pack(input_ids), attention_mask=None, use_cache=False, **plan.decoder_kwargs(), **kwargs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return plan.unpack(h)
    out = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def reference_hidden_states(ref: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                            device: torch.device, plan=None, host_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The frozen reference's last hidden states, on ``device``. The reference computes where it
    lives (:func:`compute_device`: its device, or the one a host-resident reference streams to).
    ``plan`` is the policy's pack plan (the reference runs the same attention); without it one is
    built from ``host_mask`` (the collator's CPU mask: no sync) when the reference runs varlen."""
    rdev = compute_device(ref)
    if plan is None:
        plan = pack_plan(ref, host_mask if host_mask is not None else attention_mask, rdev)
    elif plan.cu_seqlens.device != rdev:
        plan = plan.to(rdev)
    return last_hidden_states(ref, input_ids.to(rdev), None if attention_mask is None else attention_mask.to(rdev),
                              plan=plan).to(device)


def reference_head_inputs(ref: Optional[nn.Module], ref_hidden: Optional[torch.Tensor], device: torch.device) -> dict:
    """The fused loss's reference arguments (``ref_hidden``, ``ref_weight``, ``ref_bias``) on
    ``device``; ``{}`` without a reference. The head is read directly (under ZeRO-3, call inside
    the context that gathers it)."""
    if ref is None or ref_hidden is None:
        return {}
    head = lm_head_of(ref)
    return dict(ref_hidden=ref_hidden, ref_weight=head.weight.to(device, non_blocking=True),
                ref_bias=None if head.bias is None else head.bias.to(device, non_blocking=True))


# ------------------------------------------------------------------ construction under ZeRO-3
def _init_weights_gathered(model: nn.Module) -> None:
    """transformers' ``initialize_weights`` (its ``smart_apply`` order: children first) on a model
    whose parameters ZeRO-3 has partitioned: each module's own and direct children's parameters are
    gathered, initialised, and re-partitioned on leaving (rank 0's values are kept). Every rank runs
    the init, so the random-number streams stay the same on every rank, and the same as a plain
    construction's: the values are bitwise those of a plain build with the same seed where the
    accelerator is the CPU (checked with gloo); on CUDA, zero.Init creates the parameters on the GPU,
    so they are drawn from the CUDA generator and differ from a 1-process build's (not checked)."""
    import deepspeed
    from transformers.modeling_utils import PreTrainedModel

    custom = model.is_custom_code() if hasattr(model, "is_custom_code") else False

    def apply(mod: nn.Module, fn) -> None:
        for child in mod.children():
            apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        params = list(mod.parameters(recurse=False))
        for child in mod.children():
            if not isinstance(child, PreTrainedModel):
                params.extend(child.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            fn(mod, custom)

    with torch.no_grad():
        apply(model, model._initialize_weights)


@contextlib.contextmanager
def zero3_init(ds_config: dict, init_weights: bool = True):
    """Modules constructed inside are partitioned by ``deepspeed.zero.Init`` as each one's
    ``__init__`` returns: a rank holds its 1/W partition of every parameter and, transiently, one
    module's full parameters. The dtype comes from the config (``bf16.enabled``; fp32 otherwise).
    transformers' weight init (``post_init``) runs per module on gathered parameters
    (:func:`_init_weights_gathered`), so a model built from a config with a seed equals the plain
    build with that seed. ``init_weights=False``: no initialisation at all (no random numbers
    drawn), for a model whose values are then copied in (:func:`copy_partitions`). For
    ``from_pretrained`` use :func:`hf_zero3`."""
    import deepspeed
    from transformers.modeling_utils import PreTrainedModel

    deepspeed.init_distributed()  # ZeRO reads the world size from deepspeed.comm
    if not init_weights:
        from transformers.initialization import no_init_weights

        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
        return
    orig = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = _init_weights_gathered
    try:
        # no dtype argument: DeepSpeed 0.19 picks bf16 for an explicit fp32 on a CPU accelerator
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel.initialize_weights = orig


@contextlib.contextmanager
def hf_zero3(ds_config: dict):
    """``from_pretrained`` inside loads into a ZeRO-3-partitioned model (transformers' own
    ``zero.Init`` path, activated by a live ``HfDeepSpeedConfig``; unset on leaving so that later
    loads are plain)."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed()
    hf = HfDeepSpeedConfig(ds_config)
    try:
        yield hf
    finally:
        unset_hf_deepspeed_config()
        del hf


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(params):
    """A context in which ``params`` hold their full values on every rank when ZeRO-3 partitions
    them (``GatheredParameters``, a collective: every rank enters it); otherwise a null context."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _zero3_coordinator(engine):
    """ZeRO-3's parameter coordinator of a DeepSpeed ``engine``, or None for other stages (and for
    ``engine=None``)."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", opt)  # stage-3 optimiser, or the optimiser-free engine's DeepSpeedZeRoOffload
    return offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None


def reset_zero3_trace(engine) -> None:
    """Start of a forward for ZeRO-3's parameter coordinator (no-op for other stages). DeepSpeed
    does this in a forward pre-hook of the engine's root module; the trainer and the meta pass
    call the decoder (a submodule) directly, so without this the fetch trace is never completed
    and nothing is prefetched."""
    coord = _zero3_coordinator(engine)
    if coord is not None:
        coord.reset_step()


def release_zero3_leftovers(engine) -> None:
    """End of a backward that did not go through ``engine.backward`` (the meta pass's
    ``autograd.grad``): release the parameters of modules whose post-backward hook never fired (the
    input embedding, whose input needs no gradient), as DeepSpeed's backward epilogue does; else a
    later ``GatheredParameters`` exit finds them still active. No-op for other stages (and for
    DeepSpeed versions without it, which did not check)."""
    coord = _zero3_coordinator(engine)
    release = getattr(coord, "release_backward_leftovers", None)
    if release is not None:
        release()


def is_checkpointed(model: nn.Module) -> bool:
    """Whether ``model`` runs with activation (gradient) checkpointing (transformers 5's name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


@torch.no_grad()
def copy_partitions(src: nn.Module, dst: nn.Module) -> None:
    """A sharded copy: ``dst``'s parameters (and buffers) take ``src``'s values, both models of the
    same architecture partitioned by ZeRO-3 over the same ranks, each rank copying its own
    partitions (no communication, no full parameter anywhere)."""
    sp, dp = list(src.named_parameters()), list(dst.named_parameters())
    if [(n, p.ds_shape) for n, p in sp] != [(n, p.ds_shape) for n, p in dp]:
        raise ValueError("copy_partitions: the two models' parameters differ")
    for (n, a), (_, b) in zip(sp, dp):
        if a.ds_tensor.shape != b.ds_tensor.shape:
            raise ValueError(f"copy_partitions: {n} is partitioned differently ({tuple(a.ds_tensor.shape)} vs {tuple(b.ds_tensor.shape)})")
        b.ds_tensor.copy_(a.ds_tensor)
        if b.data.numel():  # persistent (small) parameters also keep their full value
            b.data.copy_(a.data)
    for (n, a), (_, b) in zip(src.named_buffers(), dst.named_buffers()):
        b.copy_(a)


def param_bytes_on_rank(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters stored on this rank: the ZeRO-3 partition (``ds_tensor``)
    of a partitioned parameter (plus its full value while gathered or persistent), else all of it."""
    total = 0
    for p in model.parameters():
        total += p.data.numel() * p.element_size()
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
    return total
