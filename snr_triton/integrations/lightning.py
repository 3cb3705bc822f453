"""Lightning: the gate monitor through `LightningModule.log`.

    def configure_optimizers(self):
        return SNRAdamW(param_groups(self, 0.1), lr=3e-4)

    trainer = lightning.Trainer(callbacks=[SNRStatsLogger(lowest=5)], log_every_n_steps=50)
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from . import log_entries, start_tracking


class SNRStatsLogger(Callback):
    """Logs the SNR gate statistics every `trainer.log_every_n_steps` steps (one device read
    each time). Turns on track_stats itself; refuses an optimizer that is not SNRAdamW."""

    def __init__(self, lowest: int = 0):
        self.lowest = lowest
        self._opts = []

    def on_train_start(self, trainer, pl_module):
        self._opts = [start_tracking(opt, pl_module) for opt in trainer.optimizers]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % max(trainer.log_every_n_steps, 1):
            return
        for k, opt in enumerate(self._opts):
            entries = log_entries(opt, self.lowest)
            if entries:
                if len(self._opts) > 1:
                    entries = {key.replace("snr/", f"snr/opt{k}/", 1): v for key, v in entries.items()}
                pl_module.log_dict(entries, on_step=True, on_epoch=False)
