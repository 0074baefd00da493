# API-SH, the paper's settings (the original's scriptskd/sh.sh): as paper_ss, but each API visit
# draws the architecture among conv4 / resnet10 / resnet18.
_base = "paper_ss"
pre_backbone = "mix"
