"""Pretrain the pool of black-box APIs. Flags only; the work is in methods/pretrain_api.py.

    python pretrain.py --dataset cifar100 --pre_backbone conv4 --APInum 100 --way_pretrain 5
    torchrun --nproc_per_node 4 pretrain.py ...     # rank r trains the APIs i with i % 4 == r
"""
import sys

from core import cli
from core.config import PRETRAIN_SETTINGS, Config, parse

PARSER = dict(prog="pretrain.py", names=PRETRAIN_SETTINGS, aliases={"api_seed": ("--seed",)},
              description="Pretrain a pool of APIs, each on --way_pretrain meta-train classes; resumable "
                          "(finished APIs are skipped) and shardable over torchrun.")


def parse_args(argv=None) -> Config:
    argv = ["--no-tensorboard" if a == "--no_tensorboard" else a for a in (sys.argv[1:] if argv is None else argv)]
    return parse(argv, **PARSER)[0]


def main(argv=None):
    from methods.pretrain_api import pretrain_pool
    return pretrain_pool(parse_args(argv))


if __name__ == "__main__":
    cli.run(main)
