# API-MH, the paper's settings (the original's scriptskd/mh.sh): each API visit draws the dataset
# (cifar100 / miniimagenet / cub) and the architecture; evaluated on the three meta-test splits
# at 84x84 and their mean.
_base = "paper_ss"
dataset = "mix"
pre_backbone = "mix"
