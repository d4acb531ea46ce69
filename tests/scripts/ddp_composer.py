"""Run by tests/test_composer.py under ``torch.distributed.run`` with 2 CPU processes (gloo).

Each rank trains the same SmallCNN with CoapAlgorithm on its shard of the digits for 8 batches and
saves its whole parameters and its optimizer's projectors to ``OUT/rank{R}.pt``: under DDP, or
with ``--fsdp2`` under FSDP2 (``parallelism_config={"fsdp": FSDP2Config()}``), checkpointing every
4 batches into ``--save`` (``--state-dict-type``: Composer's sharded or full checkpoints) or
resuming from ``--load``.  ``--step-in-backward`` turns CoapAlgorithm's step_in_backward on,
``--microbatch N`` splits each batch of 16 into micro-batches of N.
"""

import argparse

import torch
from _rank_state import save_rank_state  # this folder: run as a script
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist

from coap_plugins.algorithms import CoapAlgorithm
from coap_plugins.examples import SmallCNN, load_digits_tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fsdp2", action="store_true")
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--state-dict-type", default="sharded")
    ap.add_argument("--step-in-backward", action="store_true")
    ap.add_argument("--microbatch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_digits_tensors(size=16)
    ds = torch.utils.data.TensorDataset(data.x_train[:512], data.y_train[:512])
    sampler = dist.get_sampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
    torch.manual_seed(0)
    model = ComposerClassifier(SmallCNN(), num_classes=10)
    algorithm = CoapAlgorithm(
        rank_ratio_conv=4,
        min_conv_numel=0,
        update_interval=2,
        reproject_factor=2,
        step_in_backward=args.step_in_backward,
    )
    parallelism = None
    if args.fsdp2:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(state_dict_type=args.state_dict_type)}
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.AdamW(model.parameters(), lr=2e-3),
        algorithms=[algorithm],
        parallelism_config=parallelism,
        max_duration="8ba",
        device_train_microbatch_size=args.microbatch,
        device="cpu",
        seed=0,
        save_folder=args.save,
        save_interval="4ba",
        save_overwrite=True,
        load_path=args.load,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    save_rank_state(
        args.out,
        dist.get_global_rank(),
        dist.get_world_size(),
        trainer.state.optimizers[0],
        trainer.state.model.named_parameters(),
        algorithm.refreshes,
    )
    trainer.close()


if __name__ == "__main__":
    main()
