"""CPU offload of the reference without DeepSpeed (metapo_fast.models.offload): the streaming hooks stage
every decoder block per forward and restore the host tensors after it; values are unchanged.
(Under ZeRO-3 the reference is sharded and offloaded by DeepSpeed: tests/test_distributed.py.)"""
import copy

import pytest
import torch

from metapo_fast.models.hf import compute_device, last_hidden_states
from metapo_fast.models.offload import stream_reference
from tests.test_meta import tiny_llama


def _ids(model, n=3, t=11):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(5))


def test_streaming_hooks_stage_every_block_and_restore_host_tensors():
    ref = tiny_llama(tied=True)
    plain = copy.deepcopy(ref)
    host = {n: p.data.data_ptr() for n, p in ref.named_parameters()}
    streams = stream_reference(ref, torch.device("cpu"))
    # embedding, 2 layers, final norm, rotary embedding: every tensor of the decoder is in a block
    assert len(streams) == 5
    covered = {id(t) for s in streams for t in s.tensors}
    assert all(id(p) in covered for p in ref.model.parameters())
    ids = _ids(ref)
    during = []
    mlp = ref.model.layers[1].mlp
    probe = mlp.register_forward_pre_hook(lambda m, a: during.append(m.gate_proj.weight.data_ptr()))  # runs after staging
    with torch.no_grad():
        got = last_hidden_states(ref, ids)
        want = last_hidden_states(plain, ids)
    probe.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(s.staged == 1 for s in streams)
    assert during and during[0] != host["model.layers.1.mlp.gate_proj.weight"]  # the block ran on its staged copy
    assert {n: p.data.data_ptr() for n, p in ref.named_parameters()} == host  # back on the host tensors
    assert compute_device(ref) == torch.device("cpu")
    for s in streams:
        s.remove()


def test_streaming_refuses_a_model_that_is_not_on_the_host():
    ref = tiny_llama(tied=False).to("meta")
    with pytest.raises(ValueError, match="must be on the CPU"):
        stream_reference(ref, torch.device("cpu"))


@pytest.mark.gpu
def test_streamed_reference_on_gpu_matches_resident_and_keeps_weights_on_host():
    ref = tiny_llama(tied=False, dtype=torch.float32)
    resident = copy.deepcopy(ref).cuda()
    stream_reference(ref, torch.device("cuda"))
    ids = _ids(ref).cuda()
    with torch.no_grad():
        got = last_hidden_states(ref, ids)
        want = last_hidden_states(resident, ids)
    assert got.is_cuda
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "cpu" and p.data.is_pinned() for p in ref.parameters())
    assert compute_device(ref) == torch.device("cuda")
