"""TRL integration (MetaPOTrainer) on a tiny Llama, on CPU; README snippets and the plain example."""
import copy
import os
import re
import subprocess
import sys
import types

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from metapo_fast.integrations.trl import PAIR_ID_COLUMN, MetaPOTRLConfig, MetaPOTrainer, shifted_labels  # noqa: E402
from metapo_fast.data.synthetic import build_char_tokenizer, make_synthetic_task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(n=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    rows = make_synthetic_task(n, 0.3, 0.0, seed, 8).train_rows
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    return tok, model, ds


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, report_to="none",
                logging_steps=1, save_strategy="no", beta=0.1, seed=0, use_cpu=True, metapo_interval=2,
                metapo_val_fraction=0.1, metapo_val_batch_size=4, metapo_backend="torch")
    base.update(kw)
    return MetaPOTRLConfig(**base)


def test_metapo_trainer_trains_and_keeps_pair_identity(tmp_path):
    tok, model, ds = _setup()
    ref = copy.deepcopy(model).eval()
    tr = MetaPOTrainer(model=model, ref_model=ref, args=_args(tmp_path), train_dataset=ds, processing_class=tok)
    seen = []
    real_update = tr.metapo_tracker.update

    def spy(ids, m, k):
        seen.append(ids.clone())
        return real_update(ids, m, k)

    tr.metapo_tracker.update = spy
    before = [p.detach().clone() for p in model.parameters()]
    out = tr.train()
    assert out.global_step == 3 and all(torch.isfinite(torch.tensor(out.training_loss)).reshape(-1))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert tr.metapo_learner.updates == 1  # at step 2
    logs = {k for h in tr.state.log_history for k in h}
    for k in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "metapo/weight_std",
              "metapo/coef/ema_std"):
        assert k in logs, k
    # pair identity: every id seen by the tracker names the row whose tokens were in the batch
    train = tr.train_dataset
    ids = torch.cat(seen).tolist()
    assert len(ids) == 12 and all(0 <= i < len(train) for i in ids)
    for i in ids:
        row = train[int(train[PAIR_ID_COLUMN].index(i))]
        assert row[PAIR_ID_COLUMN] == i
    assert int(tr.metapo_tracker.visits(torch.tensor(ids)).sum()) >= len(ids)
    # the batch that TRL's collator built for these ids holds exactly these rows' tokens
    batch = tr.data_collator([train[j] for j in range(4)])
    assert batch["pair_ids"].tolist() == [train[j][PAIR_ID_COLUMN] for j in range(4)]
    first = train[0]
    assert batch["input_ids"][0, :len(first["prompt_ids"])].tolist() == first["prompt_ids"]


def test_metapo_start_fraction_delays_the_meta_updates(tmp_path):
    """metapo_start_fraction=0.5 of 4 steps with K=1: meta-updates at steps 2, 3 and 4 (not 1), as the
    trainer's meta.start_fraction; a fraction outside [0, 1) is refused at construction."""
    tok, model, ds = _setup()
    ref = copy.deepcopy(model).eval()
    tr = MetaPOTrainer(model=model, ref_model=ref, args=_args(tmp_path, max_steps=4, metapo_interval=1, metapo_start_fraction=0.5),
                       train_dataset=ds, processing_class=tok)
    steps = []
    real = tr.metapo_learner.step

    def spy(*a, **k):
        steps.append(tr.state.global_step + 1)
        return real(*a, **k)

    tr.metapo_learner.step = spy
    tr.train()
    assert steps == [2, 3, 4] and tr.metapo_learner.updates == 3
    with pytest.raises(ValueError, match="metapo_start_fraction"):
        MetaPOTrainer(model=model, ref_model=ref, args=_args(tmp_path, metapo_start_fraction=1.0), train_dataset=ds,
                      processing_class=tok)


def test_metrics_are_read_to_the_host_once_per_log_not_per_micro_batch(tmp_path, monkeypatch):
    """#15 item 4: the integration's per-micro-batch metrics stay on the device; every host read
    (.item / .tolist / float / bool of a tensor) made from metapo_fast/integrations/trl.py is
    counted: one per log call, none per micro-batch."""
    import metapo_fast.integrations.trl as M

    tok, model, ds = _setup()
    ref = copy.deepcopy(model).eval()
    tr = MetaPOTrainer(model=model, ref_model=ref, args=_args(tmp_path, max_steps=6, logging_steps=3, metapo_interval=100),
                       train_dataset=ds, processing_class=tok)
    reads = []
    here = os.path.abspath(M.__file__)
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if os.path.abspath(sys._getframe(1).f_code.co_filename) == here:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    micro = []
    real_loss = tr._compute_loss
    monkeypatch.setattr(tr, "_compute_loss", lambda *a, **k: (micro.append(1), real_loss(*a, **k))[1])
    tr.train()
    logged = [h for h in tr.state.log_history if "rewards/margins" in h]
    assert len(micro) == 6 and len(logged) == 2
    assert reads == ["tolist", "tolist"], reads  # one per log, none per micro-batch
    for h in logged:
        assert -1.0 <= h["rewards/accuracies"] <= 1.0 and h["metapo/weight_mean"] == pytest.approx(1.0)


def test_loss_at_step_0_equals_trl_dpo_loss(tmp_path):
    """Meta off, weights 1: our fused loss on TRL's first batch equals TRL's own DPO loss."""
    tok, model, ds = _setup()
    ref = copy.deepcopy(model).eval()
    ours = MetaPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=_args(tmp_path / "a", metapo_enabled=False),
                         train_dataset=ds, processing_class=tok)
    dpo_args = trl.DPOConfig(output_dir=str(tmp_path / "b"), per_device_train_batch_size=4, report_to="none", beta=0.1,
                             seed=0, use_cpu=True)
    theirs = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=dpo_args, train_dataset=ds,
                            processing_class=tok)
    items = [ours.train_dataset[i] for i in range(4)]
    b_ours = ours.data_collator(items)
    b_theirs = theirs.data_collator([{k: v for k, v in it.items() if k != PAIR_ID_COLUMN} for it in items])
    assert torch.equal(b_ours["input_ids"], b_theirs["input_ids"])
    l_ours = ours.compute_loss(ours.model, b_ours)
    l_theirs = theirs.compute_loss(theirs.model, b_theirs)
    torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-6)


def test_shifted_labels_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    cmask = torch.tensor([[0, 0, 1, 1, 0]])
    assert shifted_labels(ids, cmask).tolist() == [[-100, 7, 8, -100, -100]]


def _snippets():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"<!-- snippet:(\w+) -->\s*```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name,code", _snippets() or [("missing", "")])
def test_readme_snippets_run(name, code, monkeypatch):
    assert code, "README.md has no <!-- snippet:... --> python blocks"
    # a real module, as a user's script would be: torch.compile (torch 2.11) imports the module
    # that defines a compiled function by its __name__
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, "__readme__", module)
    exec(compile(code, f"README.md:{name}", "exec"), module.__dict__)


def test_plain_pytorch_example_runs():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "plain_pytorch.py"), "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 3" in proc.stdout


# ------------------------------------------------------------------ several ranks, DeepSpeed ZeRO-3
_ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": "auto",
          "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10 ** 9}


def _trl_worker(rank, world, port, out, per_device, zero3):
    """3 steps of MetaPOTrainer (a meta-update at step 2); saves the full weights, phi and tracker."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import contextlib

    tok, model, ds = _setup()
    ref = copy.deepcopy(model).eval()
    ds_cfg = dict(_ZERO3, train_micro_batch_size_per_gpu=per_device, train_batch_size=per_device * world)
    extra = dict(deepspeed=ds_cfg, bf16=False) if zero3 else {}
    tr = MetaPOTrainer(model=model, ref_model=ref, args=_args(os.path.join(out, "run"), per_device_train_batch_size=per_device,
                                                               **extra), train_dataset=ds, processing_class=tok)
    assert tr.accelerator.num_processes == world, (tr.accelerator.num_processes, tr.accelerator.distributed_type)
    # v != 0 (at v = 0 the batch-mean weights ignore b, whose meta-gradient is then rounding noise), but
    # 0 on the KL features: the policy starts equal to the reference, so the step-1 KLs are rounding
    # noise that the rms normalisation scales to O(1)
    with torch.no_grad():
        tr.metapo_net.v.copy_(torch.tensor([0.5, -0.3, 0.2, 0.1, 0.0, 0.0]))
    tr.train()
    policy = tr.accelerator.unwrap_model(tr.model_wrapped)
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None)
    with ctx:
        params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    torch.save({"params": params, "phi": {k: v.clone() for k, v in tr.metapo_net.state_dict().items()},
                "tracker": tr.metapo_tracker.state.clone(), "updates": tr.metapo_learner.updates,
                "zero3": any(hasattr(p, "ds_id") for p in policy.parameters())},
               os.path.join(out, f"r{rank}.pt"))


@pytest.mark.slow
def test_two_rank_zero3_trl_run_equals_one_process(tmp_path):
    """#15 item 4: MetaPOTrainer on 2 ranks under DeepSpeed ZeRO-3 (gloo, CPU; 2 pairs per rank) runs,
    with the LM heads partitioned (gathered for the fused loss and through its backward), and equals
    the 1-process run with 4 pairs: weights, meta-network (one meta-update, on the partitioned policy
    itself: no replica) and the shared tracker."""
    import torch.multiprocessing as mp
    from tests.test_distributed import _free_port

    mp.spawn(_trl_worker, args=(2, _free_port(), str(tmp_path / "two"), 2, True), nprocs=2, join=True)
    mp.spawn(_trl_worker, args=(1, _free_port(), str(tmp_path / "one"), 4, False), nprocs=1, join=True)
    one = torch.load(tmp_path / "one" / "r0.pt")
    two = [torch.load(tmp_path / "two" / f"r{k}.pt") for k in range(2)]
    assert (one["zero3"], one["updates"]) == (False, 1)
    assert [(t["zero3"], t["updates"]) for t in two] == [(True, 1)] * 2
    assert torch.equal(two[0]["tracker"], two[1]["tracker"]) and (one["tracker"][:, 5] > 0).sum() == 12
    torch.testing.assert_close(two[0]["tracker"], one["tracker"], rtol=1e-4, atol=1e-5)
    for n, p in one["params"].items():
        assert (two[0]["params"][n] - p).norm() <= 1e-5 * p.norm() + 1e-7, n
    for k, v in one["phi"].items():
        torch.testing.assert_close(two[0]["phi"][k], v, rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(two[1]["phi"][k], v, rtol=1e-4, atol=1e-6, msg=k)
