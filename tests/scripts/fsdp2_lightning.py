"""Run by tests/test_lightning.py under ``torch.distributed.run`` with 2 CPU processes (gloo).

A SmallCNN classifier shards itself with FSDP2's ``fully_shard`` in ``configure_model``
(``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``) and trains with
CoapCallback for 8 steps, saving a distributed checkpoint every 4 (``--save``), or resumes from
one (``--load``).  Each rank saves its whole parameters and projectors to ``OUT/rank{R}.pt``.
"""

import argparse

import lightning.pytorch as pl
import torch
from _rank_state import save_rank_state  # this folder: run as a script
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from coap_plugins.algorithms import CoapCallback
from coap_plugins.examples import SmallCNN, load_digits_tensors


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for module in self.net.children():
            if any(p.requires_grad for p in module.parameters()):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits_tensors(size=16)
    # 4 steps an epoch on 2 ranks: the checkpoint after step 4 is at an epoch's end, where a plain
    # DataLoader resumes exactly
    ds = torch.utils.data.TensorDataset(data.x_train[:128], data.y_train[:128])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    model = Classifier()
    cb = CoapCallback(rank_ratio_conv=4, min_conv_numel=0, update_interval=2, reproject_factor=2)
    callbacks = [cb]
    if args.save:
        callbacks.append(ModelCheckpoint(dirpath=args.save, every_n_train_steps=4, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=8,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.save),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, loader, ckpt_path=args.load)
    save_rank_state(
        args.out, trainer.global_rank, trainer.world_size, trainer.optimizers[0], model.named_parameters(), cb.refreshes
    )


if __name__ == "__main__":
    main()
