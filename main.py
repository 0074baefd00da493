"""BiDf-MKD meta-training from a pool of black-box APIs: flags -> Config -> methods.meta_train.

    bash scriptskd/ss.sh | sh.sh | mh.sh        (the paper's settings; extra flags pass through)
    python main.py --dataset demo --pretrained_path_prefix ... --episode_train 400 ...
"""
import argparse
import os

from methods.config import Config

D = Config()


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description="BiDf-MKD: black-box data-free meta-learning",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("basic")
    g.add_argument("--multigpu", type=str, default=None,
                   help="visible CUDA devices (sets CUDA_VISIBLE_DEVICES); default: keep the environment's, else '0'")
    g.add_argument("--gpu", type=int, default=D.gpu, help="CUDA device among the visible ones (CPU when none)")
    g.add_argument("--dataset", default=D.dataset, help="cifar100 | miniimagenet | cub | demo; mix for API-MH")
    g.add_argument("--pretrained_path_prefix", default=D.pretrained_path_prefix, help="root of the API pool")
    g.add_argument("--data_root", default=D.data_root, help="root of the datasets (DFL2Ldata)")
    g.add_argument("--out_dir", default=None, help="run directory (default runs/<name from the key flags>)")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of the run (model init, API draws, tasks)")
    g.add_argument("--eval_seed", type=int, default=D.eval_seed, help="seed of the fixed evaluation tasks")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from last.pth")
    g.add_argument("--overwrite", action="store_true", help="delete the run in --out_dir and start over")
    g.add_argument("--baseline", default=D.baseline, choices=("none", "random_init", "maml_real"),
                   help="random_init: evaluate the untrained meta model; maml_real: MAML on the real "
                        "meta-train images (upper bound)")
    g.add_argument("--evaluate", default=None, metavar="CHECKPOINT",
                   help="only evaluate the meta model saved in CHECKPOINT (a run's best.pth; 'random': an untrained one) "
                        "on meta_test with the test-task flags (e.g. a 1-shot-trained model on 5-shot tasks), then stop")
    g = p.add_argument_group("tasks (memory replay and evaluation)")
    for k, h in (("way_train", "classes per meta-training task"), ("num_sup_train", "support shots (training)"),
                 ("num_qur_train", "query images per class (training)"), ("way_test", "classes per test task"),
                 ("num_sup_test", "support shots (test)"), ("num_qur_test", "query images per class (test)"),
                 ("episode_train", "meta-training tasks in total"), ("episode_test", "test tasks per split"),
                 ("inner_update_num", "inner steps on replay tasks"),
                 ("test_inner_update_num", "inner steps at test time"), ("start_id", "id of the first task"),
                 ("episode_batch", "tasks per meta-batch"), ("val_interval", "tasks between evaluations"),
                 ("save_interval", "tasks between checkpoints")):
        g.add_argument(f"--{k}", type=int, default=getattr(D, k), help=h)
    g.add_argument("--backbone", default=D.backbone, help="meta model: conv4 | resnet10 | resnet18")
    g.add_argument("--inner_lr", type=float, default=D.inner_lr, help="inner-loop SGD step")
    g.add_argument("--outer_lr", type=float, default=D.outer_lr, help="Adam step of the meta model")
    g.add_argument("--approx", action="store_true", help="first-order MAML")
    g = p.add_argument_group("bi-level meta knowledge distillation")
    g.add_argument("--num_sup_kd", type=int, default=D.num_sup_kd, help="recovered support images per class")
    g.add_argument("--num_qur_kd", type=int, default=D.num_qur_kd, help="recovered query images per class")
    g.add_argument("--inner_update_num_kd", type=int, default=D.inner_update_num_kd, help="inner KD steps")
    g.add_argument("--adv", type=float, default=D.adv, help="weight of the boundary term on the query set")
    g.add_argument("--advstartit", type=int, default=D.advstartit,
                   help="boundary query sets once this many meta-iterations have passed")
    g = p.add_argument_group("API pool and data recovery")
    g.add_argument("--way_pretrain", type=int, default=D.way_pretrain, help="classes per API")
    g.add_argument("--APInum", type=int, default=D.APInum, help="APIs in the pool")
    g.add_argument("--pre_backbone", default=D.pre_backbone, help="API arch: conv4 | resnet10 | resnet18 | mix")
    g.add_argument("--generate_interval", type=int, default=D.generate_interval,
                   help="meta-batches without a better training accuracy before the next API visit")
    g.add_argument("--generate_iterations", type=int, default=D.generate_iterations, help="generator steps")
    g.add_argument("--Glr", type=float, default=D.Glr, help="generator learning rate")
    g.add_argument("--max_batch_per_class", type=int, default=D.max_batch_per_class,
                   help="task memory: syntheses kept per class")
    g.add_argument("--query_budget", type=int, default=None, help="total API queries allowed (default: no limit)")
    g.add_argument("--replay_augment", action="store_true", help="random crop/flip of replayed images")
    g = p.add_argument_group("zero-order optimisation")
    g.add_argument("--ZO", action=argparse.BooleanOptionalAction, default=False,
                   help="black box: zero-order gradient estimates (--no-ZO: white-box ablation)")
    g.add_argument("--mu", type=float, default=D.mu, help="smoothing radius")
    g.add_argument("--q", type=int, default=D.q, help="random directions per image")
    g.add_argument("--numsplit", type=int, default=D.numsplit, help="chunks the perturbed queries are sent in")
    args = p.parse_args(argv)
    if args.multigpu is None:
        args.multigpu = os.environ.get("CUDA_VISIBLE_DEVICES", D.multigpu)
    return Config(**vars(args))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = cfg.multigpu     # before torch initialises CUDA
    from methods.config import check_flags
    check_flags(cfg)                                      # bad flags fail before any data is read
    from methods.meta_train import train
    train(cfg)


if __name__ == "__main__":
    main()
