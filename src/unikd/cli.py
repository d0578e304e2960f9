"""The ``unikd`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import config as C
from .errors import UserError


def add_config_flags(p: argparse.ArgumentParser, config_help: str = "experiment YAML (defaults when omitted)") -> None:
    """The config file, its ``--set`` overrides and ``--data`` (a shorthand for ``--set data.root=...``)."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.02 (repeatable)")
    p.add_argument("--data", help="dataset folder (data.root)")


def add_common_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags every training command takes; each one is a shorthand for a ``--set`` override."""
    add_config_flags(p)
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, eval.json)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--max-iters", type=int, help="stop after N iterations (train.max_iters; smoke runs)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (train.device)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: OUT/last.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds another run, deleting its results")


def config_from_args(args) -> C.ExperimentConfig:
    flags = {"data.root": args.data, "train.epochs": getattr(args, "epochs", None),
             "train.max_iters": getattr(args, "max_iters", None), "train.device": args.device, "train.seed": args.seed}
    overrides = list(args.overrides) + [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return C.load_config(args.config, overrides)


def _resume_path(args) -> Path | None:
    if args.resume is None:
        return None
    return Path(args.resume) if args.resume else Path(args.out) / "last.pt"


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a YAML parser's error, for one, spans several)."""
    return " ".join(str(err).split())


def _verify_store(store: str) -> None:
    """``unikd store verify``: a line per problem, then a UserError (exit status 2), or one line saying it is whole."""
    from .knowledge import verify_store

    problems, summary = verify_store(store)
    for problem in problems:
        print(f"{store}: {problem}")
    if problems:
        raise UserError(f"knowledge store {store}: {len(problems)} problem(s), listed above")
    print(f"{store}: ok, {summary['records']} of {summary['expected']} records in {summary['shards']} shards "
          f"({summary['bytes']} bytes), every checksum matches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unikd", description="Universal knowledge distillation for detectors")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build an embedded dataset in COCO format")
    build.add_argument("name", choices=["digits-det"])
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--train", type=int, default=2000, help="number of train images")
    build.add_argument("--val", type=int, default=500, help="number of val images")
    build.add_argument("--heldout", type=int, default=0,
                       help="train images held out of training, in the split 'heldout' (to choose settings on)")
    build.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    build.add_argument("--masks", action="store_true", help="add each digit's instance mask (COCO RLE)")
    build.add_argument("--min-side", type=int, default=12, help="smallest digit side in pixels")
    build.add_argument("--max-digits", type=int, default=6, help="most digits per image")

    train = sub.add_parser("train", help="train a detector (teacher or student) and evaluate it")
    add_common_training_flags(train)

    ake = sub.add_parser("pretrain-ake", help="stage 1: train the AKEs on a frozen teacher")
    add_common_training_flags(ake)
    ake.add_argument("--teacher", required=True, help="teacher checkpoint (from 'unikd train')")

    dis = sub.add_parser("distill", help="stage 2: train a student with a teacher (UniKD, FitNet or none)")
    add_common_training_flags(dis)
    source = dis.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="teacher checkpoint (from 'unikd train')")
    source.add_argument("--knowledge-store", metavar="STORE",
                        help="offline UniKD or FitNet: the teacher's side from 'unikd dump' (no teacher is loaded)")
    dis.add_argument("--ake", help="AKE file from 'unikd pretrain-ake' on that teacher (method unikd)")
    dis.add_argument("--method", help="distill.method: unikd, fitnet, fgd, mgd, pkd or none (default: the config's)")

    dump = sub.add_parser("dump", help="offline: the teacher's UniKD knowledge (or FitNet's features) of every "
                          "training image to a store")
    add_config_flags(dump, "the distillation job's YAML (its data and resize; defaults when omitted)")
    dump.add_argument("--teacher", required=True, help="teacher checkpoint (from 'unikd train')")
    dump.add_argument("--knowledge", choices=["unikd", "fitnet-full", "fitnet-foreground"], default="unikd",
                      help="what to store: UniKD's knowledge, or FitNet's teacher features (whole maps, or the "
                      "cells inside the ground-truth boxes)")
    dump.add_argument("--ake", help="AKE file from 'unikd pretrain-ake' on that teacher (--knowledge unikd)")
    dump.add_argument("--out", required=True, metavar="STORE", help="the knowledge store folder (continued if it holds "
                      "an unfinished dump of the same settings)")
    dump.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                      help="of the stored embeddings (references are always float32)")
    dump.add_argument("--draws", type=int, default=1,
                      help="draws of B̂ stored per record (unikd); epoch e uses draw e mod K")
    dump.add_argument("--shard-records", type=int, default=256, help="records per shard file")
    dump.add_argument("--device", help="auto | cpu | cuda | cuda:N (train.device)")
    dump.add_argument("--seed", type=int, help="train.seed (seeds the draws of B̂)")
    dump.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")

    store = sub.add_parser("store", help="knowledge stores").add_subparsers(dest="store_command", required=True)
    verify = store.add_parser("verify", help="check a knowledge store (checksums, fields, completeness)")
    verify.add_argument("store", metavar="STORE")

    imp = sub.add_parser("import-teacher", help="a teacher checkpoint from a torchvision detection-zoo state dict")
    imp.add_argument("--family", required=True, metavar="ZOO_MODEL",
                     help="the zoo model the weights are of: retinanet_resnet50_fpn_v2, fcos_resnet50_fpn, "
                          "fasterrcnn_resnet50_fpn[_v2], maskrcnn_resnet50_fpn[_v2]")
    imp.add_argument("--weights", required=True, help="its state dict (.pth as torchvision saves it, or .safetensors)")
    imp.add_argument("--data", required=True, help="the dataset the teacher will serve (its categories, by name)")
    imp.add_argument("--out", required=True, help="the teacher checkpoint to write")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. the resize of the jobs that will use it (repeatable)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    ev = sub.add_parser("eval", help="COCO mAP of a checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", help="dataset folder (default: the one the checkpoint was trained on)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--out", help="metrics JSON file (default: next to the checkpoint)")
    ev.add_argument("--subset", action="store_true",
                    help="accept data whose categories are a subset of the checkpoint's (drops the others' detections)")

    demo = sub.add_parser("demo", help="teacher, AKEs and the student three ways on digits-det, with a report")
    demo.add_argument("--out", help="one folder per stage, and report/ (default: runs/demo[-quick])")
    demo.add_argument("--data", help="where the demo's digits-det is built (default: cache/digits-det-demo[-quick])")
    demo.add_argument("--seed", type=int, default=0, help="train.seed of every stage")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke version (seconds)")

    report = sub.add_parser("report", help="report.md and figures from finished runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run folder (train, pretrain-ake or distill), or a folder of them")
    report.add_argument("--out", required=True, help="folder for report.md and the PNG figures")
    report.add_argument("--data", help="dataset folder for the pictures (default: the one the runs used)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; ranks other than 0 only report problems
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from . import jobs  # torch and friends load only once the arguments are known to be valid
    from .engine.checkpoint import write_text

    try:
        if args.command == "data":
            from .data import build_digits_det

            root = build_digits_det(args.out, seed=args.seed, n_train=args.train, n_val=args.val, size=args.size,
                                    masks=args.masks, min_side=args.min_side, max_digits=args.max_digits,
                                    n_heldout=args.heldout)
            print(f"digits-det ready in {root}")
        elif args.command == "train":
            jobs.train_detector(config_from_args(args), args.out, _resume_path(args), args.overwrite)
        elif args.command == "pretrain-ake":
            jobs.pretrain_ake(config_from_args(args), args.teacher, args.out, _resume_path(args), args.overwrite)
        elif args.command == "distill":
            cfg = config_from_args(args)
            if args.method:
                cfg.distill.method = args.method
            jobs.distill(cfg, args.teacher, args.out, args.ake, _resume_path(args), args.overwrite, args.knowledge_store)
        elif args.command == "dump":
            jobs.dump_knowledge(config_from_args(args), args.teacher, args.ake, args.out, args.dtype, args.draws,
                                args.shard_records, args.overwrite, args.knowledge)
        elif args.command == "store":
            _verify_store(args.store)
        elif args.command == "import-teacher":
            jobs.import_teacher(args.family, args.weights, args.data, args.out, args.overrides, args.overwrite)
        elif args.command == "eval":
            metrics = jobs.evaluate_checkpoint(args.checkpoint, args.data, args.split, args.device, args.batch_size,
                                               args.subset)
            out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}.json"
            write_text(out, json.dumps(metrics, indent=2) + "\n")
            print(json.dumps(metrics))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.data, quick=args.quick, seed=args.seed, threads=args.threads)
        elif args.command == "report":
            from .report import build_report

            build_report(args.runs, args.out, args.data)
    except (UserError, FileNotFoundError) as err:  # the user's to fix: one line; anything else is a bug
        print(f"unikd: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
