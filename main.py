"""BiDf-MKD meta-training from a pool of black-box APIs: flags -> Config -> methods.meta_train.

    bash scriptskd/ss.sh | sh.sh | mh.sh          (= --preset paper_ss | paper_sh | paper_mh; extra flags pass through)
    python main.py --preset demo --episode_train 800
    python main.py <flags> --pretrain             (pretrain the API pool these flags name, then stop)
Every flag, its default and its help live in core/config.py (`python main.py --help`).
"""
import os

from core import cli
from core.config import Config, parse

PARSER = dict(prog="main.py", description="BiDf-MKD: black-box data-free meta-learning from a pool of APIs.")


def parse_args(argv=None) -> Config:
    cfg, rest = parse(argv, **PARSER)
    if "multigpu" not in rest.given:       # keep the environment's visible devices unless told otherwise
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))      # torchrun: one GPU per process of this machine
        default = ",".join(map(str, range(local))) if local > 1 else cfg.multigpu
        cfg.multigpu = os.environ.get("CUDA_VISIBLE_DEVICES", default)
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = cfg.multigpu     # before torch initialises CUDA
    if cfg.pretrain:
        from methods.pretrain_api import pretrain_pool
        return pretrain_pool(cfg)
    from methods.checks import check
    check(cfg)                                            # bad flags fail before any data is read
    from methods.meta_train import train
    return train(cfg)


if __name__ == "__main__":
    cli.run(main)
