"""Run by tests/test_lightning.py under ``torch.distributed.run`` with 2 CPU processes (gloo).

Each rank trains the same SmallCNN with CoapCallback on its shard of the digits (Lightning's
DistributedSampler) and saves its parameters and its optimizer's projectors to ``OUT/rank{R}.pt``.
``OUT [ACCUMULATE [backward]]``: ``accumulate_grad_batches`` (the loader's batch of 16 split into
that many), and CoapCallback's step_in_backward on.
"""

import sys

import lightning.pytorch as pl
import torch
from _rank_state import save_rank_state  # this folder: run as a script
from torch import nn

from coap_plugins.algorithms import CoapCallback
from coap_plugins.examples import SmallCNN, load_digits_tensors


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = SmallCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def main(out: str, accumulate: int = 1, backward: bool = False) -> None:
    torch.set_num_threads(1)
    data = load_digits_tensors(size=16)
    ds = torch.utils.data.TensorDataset(data.x_train[:512], data.y_train[:512])
    loader = torch.utils.data.DataLoader(ds, batch_size=16 // accumulate, shuffle=False)
    torch.manual_seed(0)
    model = Classifier()
    cb = CoapCallback(
        rank_ratio_conv=4, min_conv_numel=0, update_interval=2, reproject_factor=2, step_in_backward=backward
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        strategy="ddp",
        max_steps=8,
        accumulate_grad_batches=accumulate,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader)
    save_rank_state(
        out, trainer.global_rank, trainer.world_size, trainer.optimizers[0], model.named_parameters(), cb.refreshes
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1, sys.argv[3:] == ["backward"])
