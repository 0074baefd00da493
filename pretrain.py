"""Pretrain the pool of black-box APIs (DESIGN.md 2.1). Flags only; the work is in methods/pretrain_api.py.

    python pretrain.py --dataset cifar100 --pre_backbone conv4 --APInum 100 --way_pretrain 5
    torchrun --nproc_per_node 4 pretrain.py ...     # rank r trains the APIs i with i % 4 == r
"""
import argparse
import os

# Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning made
# a conv4 API train 7x slower (measured, README). Set before torch loads; export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from methods.pretrain_api import PretrainConfig, pretrain_pool  # noqa: E402


def parse_args(argv=None) -> PretrainConfig:
    p = argparse.ArgumentParser(description="Pretrain a pool of APIs, each on --way_pretrain meta-train "
                                            "classes; resumable (finished APIs are skipped) and shardable "
                                            "over torchrun.")
    p.add_argument("--dataset", default="cifar100", choices=["cifar100", "miniimagenet", "cub", "demo"])
    p.add_argument("--pre_backbone", default="conv4", choices=["conv4", "resnet10", "resnet18"],
                   help="architecture of the APIs")
    p.add_argument("--APInum", type=int, default=100, help="number of APIs in the pool")
    p.add_argument("--way_pretrain", type=int, default=5, help="classes per API")
    p.add_argument("--pretrained_path_prefix", default="./pretrained_blackbox",
                   help="pool root: <prefix>/<dataset>/<arch>/meta_train/<way>way/model/")
    p.add_argument("--data_root", default="./DFL2Ldata")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device (ignored without CUDA; "
                                                      "under torchrun each process uses its local rank)")
    p.add_argument("--seed", type=int, default=0, help="API i's classes and init depend on (seed, i)")
    p.add_argument("--epochs", type=int, default=None, help="default: 60 (cifar100, miniimagenet, demo), 100 (cub)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default 0.01 (Adam for conv4, SGD for resnets)")
    p.add_argument("--workers", type=int, default=0, help="threads decoding images")
    p.add_argument("--no_tensorboard", action="store_true",
                   help="do not write TensorBoard curves (<pool dir>/tensorboard/api_<i>)")
    a = p.parse_args(argv)
    return PretrainConfig(dataset=a.dataset, arch=a.pre_backbone, api_num=a.APInum, way=a.way_pretrain,
                          prefix=a.pretrained_path_prefix, data_root=a.data_root, gpu=a.gpu, seed=a.seed,
                          epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, workers=a.workers,
                          tensorboard=not a.no_tensorboard)


if __name__ == "__main__":
    pretrain_pool(parse_args())
