"""CPU offload of the frozen reference model without DeepSpeed (``model.ref_offload_cpu=true`` on one
process; under ZeRO-3 DeepSpeed's ``offload_param`` does the same job, see engine.ShardedReference).

The reference's parameters and buffers stay in (pinned) host memory. Each streamed block (the
embedding, every decoder layer, the final norm, the rotary embedding) gets a forward pre-hook that
points its tensors at device copies (asynchronous host-to-device copies) and a forward hook that
points them back at the host tensors, so at most one block's weights are resident on the device
at a time (plus the one the caching allocator is about to reuse). The LM head is not streamed: the
fused loss reads its weight directly, and the trainer copies it per use.
"""
from __future__ import annotations

import torch
from torch import nn

from .hf import decoder_of, lm_head_of

__all__ = ["StreamedModule", "stream_reference"]


class StreamedModule:
    """Forward hooks that stage one module's tensors on ``device`` for the duration of its forward."""

    def __init__(self, module: nn.Module, device: torch.device, pin: bool):
        self.module, self.device = module, torch.device(device)
        self.tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        if pin:
            for t in self.tensors:
                t.data = t.data.pin_memory()
        self.host = [t.data for t in self.tensors]
        self.handles = [module.register_forward_pre_hook(self._stage), module.register_forward_hook(self._release)]
        self.staged = 0  # forwards served (for tests and logs)

    def _stage(self, mod, args):
        for t, h in zip(self.tensors, self.host):
            t.data = h.to(self.device, non_blocking=True, copy=True)  # copy=True: a copy on the same device too (tests)
        self.staged += 1

    def _release(self, mod, args, output):
        for t, h in zip(self.tensors, self.host):
            t.data = h

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def stream_reference(ref: nn.Module, device: torch.device) -> list[StreamedModule]:
    """Keep ``ref`` (a frozen causal LM) on the host and stream its decoder blocks to ``device``
    per forward. Returns the hooks (``remove()`` each to undo). ``ref`` must be on the CPU."""
    if any(p.device.type != "cpu" for p in ref.parameters()):
        raise ValueError("stream_reference: the reference model must be on the CPU (model.ref_offload_cpu)")
    dec = decoder_of(ref)
    own = [n for n, _ in dec.named_parameters(recurse=False)] + [n for n, _ in dec.named_buffers(recurse=False)]
    if own:
        raise ValueError(f"stream_reference: {type(dec).__name__} holds tensors outside its blocks ({own}); "
                         "set model.ref_offload_cpu=false")
    blocks: list[nn.Module] = []
    for name, child in dec.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        else:
            blocks.append(child)
    pin = torch.device(device).type == "cuda"
    streams = [StreamedModule(b, device, pin) for b in blocks]
    head = lm_head_of(ref)
    for p in head.parameters():  # read directly by the fused loss: copied per use, from pinned memory
        if pin and not p.data.is_pinned():
            p.data = p.data.pin_memory()
    ref._metapo_compute_device = torch.device(device)
    return streams
