"""SNRAdamW in the trainers people use: Hugging Face Trainer (with the stats callback, gradient
accumulation, a bf16 model, exact resume), Accelerate (its GradScaler path), Lightning
(configure_optimizers, the stats logger, checkpoint and resume), and the param-group helper."""

import copy

import pytest
import torch

from snr_triton import SNRAdamW
from snr_triton.integrations import param_groups

transformers = pytest.importorskip("transformers", reason="pip install 'snr-triton[integrations]'")

STAT_KEYS = ("snr/mean_gate", "snr/frac_above", "snr/signal", "snr/noise")


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


class Tokens(torch.utils.data.Dataset):
    """Sequences of a repeating pattern: learnable, so the loss must fall."""

    def __init__(self, n=64, length=16):
        gen = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 64, (n, 1), generator=gen)
        self.ids = (starts + torch.arange(length) * 3) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_param_groups_split_like_hugging_face():
    model = tiny_llama()
    groups = param_groups(model, 0.1)
    decay = {n for n, _ in groups[0]["params"]}
    no_decay = {n for n, _ in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay and "model.norm.weight" in no_decay
    assert "model.layers.0.input_layernorm.weight" in no_decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay and "lm_head.weight" in decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    opt = SNRAdamW(param_groups(model, 0.1))
    assert opt.param_groups[0]["param_names"][0] == groups[0]["params"][0][0]


def trainer(tmp_path, model, steps, callbacks=(), **kw):
    from snr_triton.integrations.transformers import SNRStatsCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, logging_steps=5,
        save_steps=10, save_strategy="steps", report_to=[], seed=0, data_seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(SNRAdamW, {"lr": 3e-3, "alpha": 0.5}),
                                callbacks=[SNRStatsCallback(lowest=3), *callbacks])


@pytest.mark.parametrize("dtype,accumulation", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_hugging_face_trainer_logs_the_monitor_and_resumes_exactly(tmp_path, dtype, accumulation):
    straight = trainer(tmp_path / "a", tiny_llama(dtype), 20, gradient_accumulation_steps=accumulation)
    straight.train()
    logs = [entry for entry in straight.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert all(0 <= entry[k] <= 1 for k in STAT_KEYS[:2]) and entry["snr/signal"] > 0
        assert sum(k.startswith("snr/lowest_gate/") for k in entry) == 3
    assert logs[-1]["loss"] < logs[0]["loss"]

    resumed = trainer(tmp_path / "a", tiny_llama(dtype), 20, gradient_accumulation_steps=accumulation)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    opt = resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer") else resumed.optimizer
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt.state.values())  # never the model's bf16


def test_trainer_with_an_optimizer_and_scheduler_passed_in(tmp_path):
    from snr_triton.integrations.transformers import SNRStatsCallback

    model = tiny_llama()
    opt = SNRAdamW(param_groups(model, 0.1), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                                          logging_steps=5, report_to=[], use_cpu=True, disable_tqdm=True,
                                          save_strategy="no")
    t = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched),
                             callbacks=[SNRStatsCallback(lowest=2)])
    t.train()
    logs = [e for e in t.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(k in logs[-1] for k in STAT_KEYS)
    assert any(k.startswith("snr/group1/") for k in logs[-1])  # the no-decay group, reported on its own
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 / 11)


def test_callback_refuses_another_optimizer(tmp_path):
    from snr_triton.integrations.transformers import SNRStatsCallback

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    t = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(),
                             callbacks=[SNRStatsCallback()])
    with pytest.raises(TypeError, match="need an SNRAdamW optimizer, got AdamW"):
        t.train()


def test_accelerate_prepare_and_its_grad_scaler_path():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, SNRAdamW(model.parameters(), lr=1e-2))
    twin_opt = SNRAdamW(twin.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(3):
        for m, o, backward in ((model, opt, accelerator.backward), (twin, twin_opt, torch.Tensor.backward)):
            o.zero_grad()
            backward(torch.nn.functional.mse_loss(m(x), y))
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # the GradScaler path Accelerate takes in fp16: an overflow makes the step a no-op. (Accelerate
    # reports step_was_skipped only for optimizers whose step GradScaler does not call; SNRAdamW,
    # like torch's fused AdamW, unscales in its own pass, so GradScaler always calls it.)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = AcceleratedOptimizer(SNRAdamW(twin.parameters(), lr=1e-2), scaler=scaler)
    for overflow in (False, True):
        scaled.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(twin(x), y)).backward()
        if overflow:
            before = ([p.detach().clone() for p in twin.parameters()], copy.deepcopy(scaled.optimizer.state_dict()))
            next(twin.parameters()).grad[0, 0] = float("inf")
        scaled.step()
        assert scaler.get_scale() == (2.0**7 if overflow else 2.0**8)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), before[0]))
    for i, st in before[1]["state"].items():
        for key, value in st.items():
            assert torch.equal(scaled.optimizer.state_dict()["state"][i][key], value)


def test_lightning_trains_logs_checkpoints_and_resumes(tmp_path):
    lightning = pytest.importorskip("lightning")
    from snr_triton.integrations.lightning import SNRStatsLogger

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return SNRAdamW(param_groups(self, 0.01), lr=1e-2)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=gen), torch.randn(64, 1, generator=gen))

    def fit(epochs, ckpt=None):  # 4 steps an epoch; Lightning resumes exactly at epoch boundaries
        module = Module()
        t = lightning.Trainer(max_epochs=epochs, logger=lightning.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=5,
                              callbacks=[SNRStatsLogger(lowest=2)], enable_progress_bar=False,
                              enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                              enable_checkpointing=False, deterministic=True)
        t.fit(module, torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=ckpt)
        return t, module

    straight, straight_module = fit(2)
    assert all(k in straight.logged_metrics for k in STAT_KEYS)
    assert sum(k.startswith("snr/lowest_gate/") for k in straight.logged_metrics) == 2
    half, _ = fit(1)
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_module = fit(2, ckpt=str(tmp_path / "half.ckpt"))
    for a, b in zip(resumed_module.parameters(), straight_module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", ["float32", "uint8"])
def test_train_llm_quick_with_two_ranks(state_dtype, tmp_path):
    """bench/train_llm.py --quick under torchrun: FSDP2, torch.compile, bf16 autocast, DCP
    checkpoint and resume (which must end exactly where the straight run ends), both optimizers;
    SNRAdamW alone again with 8-bit states (codes and scales as DTensors through DCP)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "train_llm.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = ["AdamW", "SNRAdamW"] if state_dtype == "float32" else ["SNRAdamW"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
                           "--nproc-per-node", "2", str(script), "--quick", "--out", str(tmp_path),
                           "--state-dtype", state_dtype, "--optimizers", *names],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "train_llm_seed0.json").read_text())
    assert report["world"] == 2 and report["resume_exact"] == {name: True for name in names}
    for name in names:
        r = report["results"][name]
        assert r["held"][-1] < 5.5  # log(256) = 5.55: both learn something about bytes in 20 steps
        assert r["tokens_per_s"] > 0 and 0 < r["optimizer_share"] < 1
    assert all(0 < g <= 1 for g in report["results"]["SNRAdamW"]["gate"])
    assert (tmp_path / "train_llm_seed0.png").stat().st_size > 10_000


def test_trainer_with_clipping_in_the_step_equals_the_trainers_own_clipping(tmp_path):
    """Issue 20: Trainer(max_grad_norm=0) with SNRAdamW(max_grad_norm=1.0) against the Trainer's own
    clipping (max_grad_norm=1.0, clip_grad_norm_ before a plain SNRAdamW): the same norms logged
    (the Trainer's `grad_norm`, our `snr/grad_norm`) and the same params."""
    from snr_triton.integrations.transformers import SNRStatsCallback

    runs = {}
    for who, (trainer_clip, ours) in {"trainer": (1.0, None), "snr": (0.0, 1.0)}.items():
        model = tiny_llama()
        opt = SNRAdamW(param_groups(model, 0.1), lr=3e-3, max_grad_norm=ours)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / who), max_steps=6, per_device_train_batch_size=8,
                                              logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                                              save_strategy="no", max_grad_norm=trainer_clip)
        t = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None),
                                 callbacks=[SNRStatsCallback()])
        t.train()
        runs[who] = (t, [e for e in t.state.log_history if "loss" in e])
    theirs = [e["grad_norm"] for e in runs["trainer"][1]]
    ours = [e["snr/grad_norm"] for e in runs["snr"][1]]
    assert len(ours) == 6 and max(theirs) > 1.0  # clipping was active
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a, b in zip(runs["snr"][0].model.parameters(), runs["trainer"][0].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(e["snr/skipped_steps"] == 0 for e in runs["snr"][1])


def test_accelerate_with_clipping_in_the_step_equals_its_own_clip_grad_norm_():
    """Issue 20: Accelerate's recipe (accelerator.clip_grad_norm_ before a plain step) against
    SNRAdamW(max_grad_norm=...) prepared by the same Accelerator, no clipping call."""
    accelerate = pytest.importorskip("accelerate")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, SNRAdamW(model.parameters(), lr=1e-2, max_grad_norm=0.1))
    twin, twin_opt = accelerator.prepare(twin, SNRAdamW(twin.parameters(), lr=1e-2))
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
        twin_opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(twin(x), y))
        norm = accelerator.clip_grad_norm_(twin.parameters(), 0.1)
        twin_opt.step()
        assert norm > 0.1  # clipping was active
        torch.testing.assert_close(opt.optimizer.last_grad_norm(), norm, rtol=1e-6, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lightning_with_clipping_in_the_step_equals_its_gradient_clip_val(tmp_path):
    """Issue 20: Trainer(gradient_clip_val=c) with a plain SNRAdamW against Trainer(gradient_clip_val=
    None) with SNRAdamW(max_grad_norm=c): the same params; SNRStatsLogger logs snr/grad_norm."""
    lightning = pytest.importorskip("lightning")
    from snr_triton.integrations.lightning import SNRStatsLogger

    class Module(lightning.LightningModule):
        def __init__(self, max_grad_norm):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.max_grad_norm = max_grad_norm

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return SNRAdamW(self.parameters(), lr=1e-2, max_grad_norm=self.max_grad_norm)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=gen), 10 * torch.randn(64, 1, generator=gen))

    def fit(clip_val, ours):
        module = Module(ours)
        t = lightning.Trainer(max_epochs=1, logger=lightning.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
                              callbacks=[SNRStatsLogger()], enable_progress_bar=False, enable_model_summary=False,
                              default_root_dir=tmp_path, accelerator="cpu", enable_checkpointing=False,
                              deterministic=True, gradient_clip_val=clip_val, gradient_clip_algorithm="norm")
        t.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
        return t, module

    theirs, their_module = fit(0.5, None)
    ours, our_module = fit(None, 0.5)
    assert ours.logged_metrics["snr/grad_norm"] > 0.5  # clipping was active at the last step
    assert "snr/grad_norm" not in theirs.logged_metrics
    for a, b in zip(our_module.parameters(), their_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
