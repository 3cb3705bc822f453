"""Hugging Face Trainer: the gate monitor in the Trainer's logs.

    from snr_triton import SNRAdamW
    from snr_triton.integrations import param_groups
    from snr_triton.integrations.transformers import SNRStatsCallback

    trainer = Trainer(model, args, train_dataset=...,
                      optimizer_cls_and_kwargs=(SNRAdamW, {"lr": 3e-4}),
                      callbacks=[SNRStatsCallback(lowest=5)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from . import log_entries, start_tracking


class SNRStatsCallback(TrainerCallback):
    """Adds snr/mean_gate, snr/frac_above, snr/signal, snr/noise (per group too, and the
    `lowest` params with the lowest gate when params are named) to every training log.
    Turns on track_stats itself; reads the device once per log, never per step."""

    def __init__(self, lowest: int = 0):
        self.lowest = lowest
        self._opt = None

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        self._opt = start_tracking(optimizer, model)  # raises for any optimizer other than SNRAdamW

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._opt is None or logs is None or "loss" not in logs:
            return
        entries = log_entries(self._opt, self.lowest)
        if not entries:
            return
        logs.update(entries)  # seen by the reporting callbacks after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
