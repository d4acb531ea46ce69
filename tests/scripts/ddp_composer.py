"""Run by tests/test_composer.py under ``torch.distributed.run`` with 2 CPU processes (gloo).

Each rank trains the same SmallCNN with CoapAlgorithm on its shard of the digits and saves its
parameters and its optimizer's projectors to ``OUT/rank{R}.pt``.
"""

import sys

import torch
from _rank_state import save_rank_state  # this folder: run as a script
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist

from coap_plugins.algorithms import CoapAlgorithm
from coap_plugins.examples import SmallCNN, load_digits_tensors


def main(out: str) -> None:
    torch.set_num_threads(1)
    data = load_digits_tensors(size=16)
    ds = torch.utils.data.TensorDataset(data.x_train[:512], data.y_train[:512])
    sampler = dist.get_sampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
    torch.manual_seed(0)
    model = ComposerClassifier(SmallCNN(), num_classes=10)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.AdamW(model.parameters(), lr=2e-3),
        algorithms=[CoapAlgorithm(rank_ratio_conv=4, min_conv_numel=0, update_interval=2, reproject_factor=2)],
        max_duration="8ba",
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    save_rank_state(
        out,
        dist.get_global_rank(),
        dist.get_world_size(),
        trainer.state.optimizers[0],
        trainer.state.model.named_parameters(),
        trainer.state.algorithms[0].refreshes,
    )


if __name__ == "__main__":
    main(sys.argv[1])
