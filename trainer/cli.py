"""The ``trainer`` command: thin sub-commands that parse arguments and call the library.

Errors a user can act on (a missing bucket, bad credentials, ...) end as one ``trainer: error:`` line and
exit status 1, never a traceback; usage errors exit 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trainer import __version__, storage
from trainer.config import AUGMENT_PRESETS, DEFAULT_MAX_PIXELS
from trainer.errors import InputError
from trainer.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from trainer.logs import LEVELS, setup_logging

if TYPE_CHECKING:  # the data modules import torch: only the commands that need them load them
    from trainer.data.dataset import CocoDetection

log = logging.getLogger("trainer.cli")

# Parallel processes for convert/stats: every core, but not so many that a big node starves its neighbours.
PROCESS_WORKERS = max(1, min(8, os.cpu_count() or 1))  # as ConvertOptions.workers
SYNTH_MAX_SIZE = 4096  # --size: a 4096² RGB image is 50 MB; 100000² would be 30 GB
SYNTH_MAX_IMAGES = 1_000_000
MAX_REPORT_BYTES = 256 << 20  # --skip-if-done reads the previous report: one item per problem, a few hundred bytes each


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ commands
def cmd_ls(args: argparse.Namespace) -> int:
    count = total = 0
    for info in storage.list_objects(args.uri, recursive=args.recursive):
        if args.json:
            print(json.dumps({"uri": info.uri, "size": info.size, "is_dir": info.is_dir,
                              "mtime": info.mtime.isoformat() if info.mtime else None}))
        elif info.is_dir:
            print(f"{'':19} {'DIR':>10}  {info.uri}")
        else:
            when = info.mtime.strftime("%Y-%m-%d %H:%M:%S") if info.mtime else "-"
            print(f"{when:19} {info.size:>10}  {info.uri}")
        count += not info.is_dir
        total += info.size
    if count == 0 and not storage.is_dir(args.uri):
        raise storage.NotFound(args.uri, "no such object, file or directory")
    if args.summary:
        print(f"{count} objects, {_human(total)}")
    return EXIT_OK


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    if args.recursive:
        plan = storage.plan_tree_copy(src, dst)
        if not plan:
            raise storage.NotFound(src, "nothing to copy (no objects below this prefix or directory)")
        log.info("copying %d objects (%s) from %s to %s", len(plan), _human(sum(p[2] for p in plan)), src, dst)
        summary = storage.copy_many(plan, workers=args.workers)
    else:
        if storage.is_dir(src) and not storage.exists(src):
            raise storage.StorageError(src, "is a directory or prefix; use --recursive to copy what it holds")
        if dst.endswith(("/", os.sep)) or (storage.is_dir(dst) and not storage.is_s3(dst)):
            dst = storage.join(dst, storage.basename(src))
        started = time.perf_counter()
        size = storage.copy(src, dst)
        summary = storage.TransferSummary(1, size, time.perf_counter() - started)
    log.info("copied %d objects, %s in %.2f s (%.1f MB/s) to %s",
             summary.objects, _human(summary.bytes), summary.seconds, summary.mb_per_s, dst)
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from trainer.annotations.convert import ConvertOptions, convert, summary_text

    options = ConvertOptions(
        voc_root=args.voc_root, out=args.out, all=args.all, labels=args.labels, voc_offset=args.voc_offset,
        difficult=args.difficult, strict=args.strict, workers=args.workers, report=args.report,
        annotations_only=args.annotations_only,
        splits=[s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None,
    )
    if args.skip_if_done:
        if not args.report:
            print("trainer: error: convert: --skip-if-done needs --report (the record of a previous conversion)",
                  file=sys.stderr)
            return EXIT_USAGE
        done = previous_conversion(args.report, options.splits)
        if done:
            log.info("convert: skipped: %s", done)
            return EXIT_OK
    result = convert(options)
    print(summary_text(result), file=sys.stderr)
    return result.exit_code


def previous_conversion(report_uri: str, splits: list[str] | None) -> str | None:
    """Why a conversion can be skipped (its report says it succeeded and its outputs exist), or None.

    The chart's convert step runs on every install and upgrade; this makes it idempotent. Anything odd about the
    report (missing, unreadable, not ok, an output gone) means converting again, never skipping wrongly.
    """
    try:
        report = json.loads(storage.read_text(report_uri, max_bytes=MAX_REPORT_BYTES))
    except storage.StorageError:  # TooLarge included: a report is a few KB per problem
        return None
    except ValueError as exc:
        log.warning("convert: %s is not valid JSON (%s); converting again", report_uri, exc)
        return None
    if not isinstance(report, dict) or report.get("ok") is not True or not isinstance(report.get("splits"), dict):
        log.info("convert: %s does not record a successful conversion; converting again", report_uri)
        return None
    recorded: dict[str, Any] = report["splits"]
    wanted = splits if splits is not None else list(recorded)
    outputs = [recorded.get(split, {}).get("uri") if isinstance(recorded.get(split), dict) else None
               for split in wanted]
    if not wanted or not all(isinstance(uri, str) and storage.exists(uri) for uri in outputs):
        log.info("convert: %s lacks an output for splits %s; converting again", report_uri, ",".join(wanted))
        return None
    return (f"{report_uri} records a successful conversion and {', '.join(str(uri) for uri in outputs)} exist "
            "(drop --skip-if-done to redo it)")


def _dataset(args: argparse.Namespace, transforms: Any = None) -> CocoDetection:
    from trainer.data.coco_index import load_coco_index
    from trainer.data.dataset import CocoDetection

    return CocoDetection(load_coco_index(args.coco), args.images, transforms, drop_empty=False,
                         seed=getattr(args, "seed", 0), max_pixels=args.max_pixels)


def cmd_stats(args: argparse.Namespace) -> int:
    from trainer.data.stats import channel_stats

    dataset = _dataset(args)
    log.info("computing per-channel mean/std over %d images with %d workers", len(dataset), args.workers)
    stats = channel_stats(dataset, workers=args.workers)
    log.info("%d images, %d pixels%s", stats.images, stats.pixels,
             f"; {len(stats.skipped)} unreadable images skipped and not counted" if stats.skipped else "")
    print(stats.as_yaml(), end="")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from trainer.data.show import render_grids
    from trainer.data.transforms import build_transforms

    if args.n < 1 or args.epoch < 0:
        print("trainer: error: show: --n must be at least 1 and --epoch 0 or more", file=sys.stderr)
        return EXIT_USAGE
    dataset = _dataset(args, build_transforms(args.augment, train=True))
    for uri in render_grids(dataset, args.out, count=args.n, epoch=args.epoch):
        print(uri)
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from trainer.synth import make_shapes_dataset

    if not 2 <= args.n <= SYNTH_MAX_IMAGES or not 32 <= args.size <= SYNTH_MAX_SIZE:
        print(f"trainer: error: synth: --n must be in [2, {SYNTH_MAX_IMAGES}] and --size in [32, {SYNTH_MAX_SIZE}]",
              file=sys.stderr)
        return EXIT_USAGE
    result = make_shapes_dataset(args.out, n=args.n, size=args.size, seed=args.seed)
    log.info("wrote %d train and %d val images (%d shapes): %s, %s, images under %s", result.train_images,
             result.val_images, result.objects, result.train_uri, result.val_uri, result.images_uri)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.distributed import DistEnv
    from trainer.inference import build_validation, evaluate, load_detector

    config = load_config(args.config, args.set)
    split = getattr(config.data, args.split)
    if not split.coco:
        raise InputError(f"{args.config}: data.{args.split}.coco is not set: nothing to evaluate on")
    validation = build_validation(split, config, DistEnv())  # the COCO file is read once, for classes and scoring
    detector = load_detector(args.weights, config.model, validation.index)
    result = evaluate(detector.model, validation, DistEnv())
    assert result is not None  # a single process is rank 0
    print(" ".join(f"{name} {value:.4f}" for name, value in result.stats.items()))
    print(" ".join(f"{name} {value:.4f}" for name, value in result.per_class.items()))
    if args.out:
        storage.write_text(args.out, json.dumps({"weights": args.weights, "split": args.split, "coco": split.coco,
                                                 **result.stats, "per_class_ap": result.per_class,
                                                 "detections": result.detections}, indent=1) + "\n")
        log.info("wrote %s", args.out)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.data.coco_index import load_coco_index
    from trainer.inference import list_images, load_detector, write_predictions

    if not 0 <= args.score_thr <= 1:
        raise InputError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    model_config = index = None
    if args.config:
        config = load_config(args.config, require_data=False)
        model_config = config.model
        index = load_coco_index(config.data.train.coco) if config.data.train.coco else None
    uris = list_images(args.images)  # before the model: a wrong path fails in a second
    detector = load_detector(args.weights, model_config, index)
    summary = write_predictions(detector, uris, args.out, args.score_thr, args.batch_size,
                                pictures=not args.no_pictures, max_pixels=args.max_pixels)
    log.info("%d images, %d detections with score >= %.2f: %s%s", summary.images, summary.detections,
             args.score_thr, summary.json_uri, f" and {len(summary.picture_uris)} PNGs" if summary.picture_uris else "")
    return EXIT_OK


def _checkpoints_root(uri: str) -> str:
    from trainer.checkpoint import LATEST, checkpoints_uri

    nested = checkpoints_uri(uri)
    return nested if storage.exists(storage.join(nested, LATEST)) or storage.is_dir(nested) else uri


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    from trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, read_latest
    from trainer.checkpoint.state import check_resumable

    root = _checkpoints_root(args.uri)
    found = list_checkpoints(root)
    if not found:
        raise InputError(f"{args.uri}: no checkpoints there (expected step-<N> folders or a checkpoints/ folder)")
    latest = read_latest(root)
    scored = [(c.metric, c.step) for c in found if c.committed and c.metric is not None]
    best = max(scored)[1] if scored else None
    rows: list[dict[str, Any]] = []
    for item in found:
        verified: bool | None = False if item.problem else None
        if args.verify and item.committed:
            try:  # every payload loaded and checked the way a resume does
                check_resumable(load_checkpoint(item.uri))
                verified = True
            except CheckpointError as exc:
                log.error("CORRUPT: %s", exc)
                verified = False
        flags = [name for name, on in (("latest", item.uri == latest), ("best", item.step == best)) if on]
        rows.append({"step": item.step, "epoch": item.epoch + 1 if item.epoch is not None else None,
                     "size": item.size, "metric": item.metric, "created": item.created,
                     "committed": item.committed, "verified": verified, "flags": flags, "uri": item.uri,
                     "problem": item.problem})
    healthy = all(row["verified"] is not False for row in rows)  # exit 1 when any checkpoint is CORRUPT
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK if healthy else EXIT_FAILURE
    print(f"{'step':>9} {'epoch':>5} {'size':>9} {'metric':>7} {'created':25} {'state':10} uri")
    for row in rows:
        state = "CORRUPT" if row["verified"] is False else "verified" if row["verified"] else \
            "committed" if row["committed"] else "partial"
        metric = f"{row['metric']:.4f}" if row["metric"] is not None else "-"
        print(f"{row['step']:>9} {row['epoch'] if row['epoch'] is not None else '-':>5} {_human(row['size']):>9} "
              f"{metric:>7} {row['created'] or '-':25} {state:10} {row['uri']}"
              + (f"  ({', '.join(row['flags'])})" if row["flags"] else ""))
    return EXIT_OK if healthy else EXIT_FAILURE


def cmd_ckpt_export(args: argparse.Namespace) -> int:
    from trainer.checkpoint import resolve
    from trainer.weights import checkpoint_weights, write_weights

    checkpoint = resolve(args.uri, check=checkpoint_weights, names=("model",))
    write_weights(args.out, checkpoint_weights(checkpoint, ema=args.ema))
    log.info("exported %s weights of step %d (%s) to %s", "EMA" if args.ema else "model", checkpoint.step,
             checkpoint.uri, args.out)
    return EXIT_OK


EXPORT_FORMATS = ("torchscript", "onnx")  # trainer.export.FORMATS (that module imports torch: loaded on use)


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import DEFAULT_OPSET, ExportOptions, export

    if args.opset is not None and args.format != "onnx":
        print("trainer: error: export: --opset applies to --format onnx only", file=sys.stderr)
        return EXIT_USAGE
    options = ExportOptions(args.source, args.format, args.out, ema=args.ema,
                            image_size=tuple(args.image_size) if args.image_size else None,
                            opset=DEFAULT_OPSET if args.opset is None else args.opset, check_images=args.check_images)
    result = export(options)
    print("\n".join(result.report.lines()))
    if result.deleted:
        print(f"trainer: error: export: the {result.format} export of {result.model_name} does not match the eager "
              f"model (see the parity report above); {result.out} deleted", file=sys.stderr)
        return EXIT_FAILURE
    log.info("exported %s (%s) to %s: %s, %s", result.model_name, result.source, result.out, result.format,
             _human(result.size_bytes))
    return EXIT_OK


# ------------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LEVELS, type=str.upper, default=argparse.SUPPRESS,
                        help="verbosity of the log lines on stderr (default INFO, or $TRAINER_LOG_LEVEL)")
    parser = argparse.ArgumentParser(
        prog="trainer", parents=[common],
        description="Train torchvision object detectors on data in S3, locally or on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", parents=[common], help="list objects under an s3:// URI or local directory")
    ls.add_argument("uri", help="s3://bucket/prefix or a local path")
    ls.add_argument("-r", "--recursive", action="store_true", help="list every object below, not one level")
    ls.add_argument("--json", action="store_true", help="one JSON object per line instead of columns")
    ls.add_argument("--summary", action="store_true", help="print the object count and total size at the end")
    ls.set_defaults(func=cmd_ls)

    cp = sub.add_parser("cp", parents=[common], help="copy files/objects between local paths and s3:// URIs")
    cp.add_argument("src", help="source file, object, or (with --recursive) directory/prefix")
    cp.add_argument("dst", help="destination; a trailing '/' or an existing directory keeps the source name")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy everything below SRC, in parallel")
    cp.add_argument("--workers", type=int, default=storage.DEFAULT_WORKERS,
                    help=f"parallel transfers (default {storage.DEFAULT_WORKERS})")
    cp.set_defaults(func=cmd_cp)

    conv = sub.add_parser(
        "convert", parents=[common], help="convert Pascal VOC annotations to COCO JSON (local or s3://)",
        description="Convert a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/) to one COCO JSON "
                    "per split. Exit 0: converted (warnings allowed); 1: some files could not be converted "
                    "(or any warning with --strict); 2: usage error.")
    conv.add_argument("--voc-root", required=True, help="the VOC folder: local path or s3://bucket/prefix")
    conv.add_argument("--out", required=True, help="where <split>.json files go: local path or s3:// prefix")
    which = conv.add_mutually_exclusive_group()
    which.add_argument("--splits", help="comma-separated split names from ImageSets/Main (default: every split file)")
    which.add_argument("--all", action="store_true", help="one all.json with every annotation, ignoring splits")
    conv.add_argument("--labels", help="file/URI with one class name per line: fixes category ids 1..K")
    conv.add_argument("--voc-offset", action="store_true",
                      help="apply the VOC devkit's 1-based convention (xmin-1, ymin-1; inclusive max)")
    conv.add_argument("--difficult", choices=("keep", "crowd", "drop"), default="crowd",
                      help="difficult objects: crowd = kept with iscrowd=1 so COCOeval ignores them (default)")
    conv.add_argument("--strict", action="store_true", help="any warning fails the run and nothing is written")
    conv.add_argument("--workers", type=int, default=PROCESS_WORKERS,
                      help="parallel parser processes (the output does not depend on it)")
    conv.add_argument("--annotations-only", action="store_true",
                      help="convert without JPEGImages/: no image existence check, sizes from each XML's <size> "
                           "(for annotations stored apart from their images)")
    conv.add_argument("--report", help="write every problem, file by file, as JSON to this path/URI")
    conv.add_argument("--skip-if-done", action="store_true",
                      help="do nothing when --report records a successful conversion whose outputs all exist "
                           "(the chart's convert step, run on every install and upgrade)")
    conv.set_defaults(func=cmd_convert)

    data_args = argparse.ArgumentParser(add_help=False)
    data_args.add_argument("--coco", required=True, help="COCO JSON (local or s3://)")
    data_args.add_argument("--images", required=True, help="image root the file_names are relative to")
    data_args.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                           help="skip images whose header declares more pixels, unread (default: Pillow's "
                                f"decompression-bomb limit, {DEFAULT_MAX_PIXELS})")

    stats = sub.add_parser("stats", parents=[common, data_args],
                           help="exact per-channel mean/std of a data set, printed in the config's format")
    stats.add_argument("--workers", type=int, default=PROCESS_WORKERS)
    stats.set_defaults(func=cmd_stats)

    show = sub.add_parser("show", parents=[common, data_args],
                          help="PNG grids of samples with boxes and class names, after augmentation")
    show.add_argument("--out", required=True, help="folder or s3:// prefix for the PNG files")
    show.add_argument("--augment", choices=AUGMENT_PRESETS, default="none", help="augmentation preset to apply")
    show.add_argument("--n", type=int, default=16, help="how many samples (16 per grid)")
    show.add_argument("--epoch", type=int, default=0, help="epoch whose augmentation draws to show")
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=cmd_show)

    synth = sub.add_parser("synth", parents=[common],
                           help="generate a COCO data set of coloured shapes (a quick proof that training learns)")
    synth.add_argument("--out", required=True, help="folder or s3:// prefix: train.json, val.json, images/")
    synth.add_argument("--n", type=int, default=400, help="number of images (20%% go to val)")
    synth.add_argument("--size", type=int, default=192, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)

    evaluate = sub.add_parser("eval", parents=[common], help="COCO mAP of a weights file on a split of the config")
    evaluate.add_argument("--config", required=True, help="the run's YAML config (local or s3://)")
    evaluate.add_argument("--weights", required=True, help="model_best.pt, model_final.pt, an export, or a state dict")
    evaluate.add_argument("--split", choices=("val", "train"), default="val")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    evaluate.add_argument("--out", help="also write the numbers as JSON here (path or s3:// URI)")
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser("predict", parents=[common],
                             help="detect objects in images: detections JSON and PNGs with the boxes drawn")
    predict.add_argument("--weights", required=True, help="weights file written by the trainer (path or URI)")
    predict.add_argument("--images", required=True, help="an image, a folder/prefix, or a glob like s3://b/x/*.jpg")
    predict.add_argument("--out", required=True, help="folder or s3:// prefix for detections.json and the PNGs")
    predict.add_argument("--score-thr", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--batch-size", type=int, default=4)
    predict.add_argument("--config", help="for a plain state dict: the config naming the model and its classes")
    predict.add_argument("--no-pictures", action="store_true", help="only write detections.json")
    predict.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                         help="skip images whose header declares more pixels, unread (default: "
                              f"{DEFAULT_MAX_PIXELS})")
    predict.set_defaults(func=cmd_predict)

    ckpt = sub.add_parser("ckpt", parents=[common], help="list and export checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="{ls,export}")
    ckpt_ls = ckpt_sub.add_parser("ls", parents=[common], help="a run's checkpoints: steps, sizes, metrics, "
                                                              "which is latest and best")
    ckpt_ls.add_argument("uri", help="a run folder (runs/<name>) or its checkpoints/ folder, local or s3://")
    ckpt_ls.add_argument("--verify", action="store_true",
                         help="read every object, check its sha256 and load it the way a resume does")
    ckpt_ls.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    ckpt_ls.set_defaults(func=cmd_ckpt_ls)
    ckpt_export = ckpt_sub.add_parser("export", parents=[common],
                                      help="a weights-only file for `trainer predict`/`eval` from a checkpoint")
    ckpt_export.add_argument("uri", help="a run (its latest checkpoint), a checkpoints folder or a step-<N> folder")
    ckpt_export.add_argument("--out", required=True, help="the weights file to write (path or s3:// URI)")
    ckpt_export.add_argument("--ema", action="store_true", help="export the EMA weights instead")
    ckpt_export.set_defaults(func=cmd_ckpt_export)

    exp = sub.add_parser(
        "export", parents=[common], help="a TorchScript or ONNX model for inference servers, checked against PyTorch",
        description="Export a trained detector to TorchScript or ONNX, then load the written file back (TorchScript "
                    "with torch, ONNX with ONNX Runtime on the CPU) and compare its detections with the eager model's "
                    "on sample images at two sizes. Exit 0: exported and the check passed; 1: refused, or the check "
                    "failed (the output is deleted); 2: usage error. See docs/deploying.md.")
    exp.add_argument("source", help="a weights file, a run (its newest good checkpoint), a checkpoints or a step-<N> "
                                    "folder; local or s3://")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="torchscript or onnx")
    exp.add_argument("--out", required=True, help="the file to write (path or s3:// URI)")
    exp.add_argument("--ema", action="store_true", help="export a checkpoint's EMA weights instead")
    exp.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                     help="the example image the export is traced with and the first check size (default: the "
                          "model's min_size x max_size; SSD: its fixed side); sizes stay dynamic")
    exp.add_argument("--opset", type=int, help="ONNX opset (default 17; 11 to 20)")
    exp.add_argument("--check-images", help="images for the parity check: a file, folder/prefix or glob (up to 4 "
                                            "used; default: generated shapes images)")
    exp.set_defaults(func=cmd_export)

    watch = sub.add_parser("watch", parents=[common], help="one view of a training release on the cluster",
                           description="Pods, progress, ETA, last evaluation and checkpoint of a release installed "
                                       "with charts/train, with warnings (hung rank, restarts, OOMKilled, image "
                                       "pulls, unschedulable pods). Exit 1 when the Job failed or the cluster "
                                       "cannot be asked.")
    watch.add_argument("release", help="the Helm release name (helm install <release> charts/train)")
    watch.add_argument("-n", "--namespace", default=None, help="default: the context's namespace, else 'default'")
    watch.add_argument("--context", help="kubeconfig context (default: the current one)")
    watch.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    watch.add_argument("-f", "--follow", action="store_true", help="refresh until the Job ends")
    watch.add_argument("--logs", choices=("none", "rank0", "all"), default="none",
                       help="also print the pods' log lines, prefixed [pod/rank N] (all) or rank 0's only")
    watch.add_argument("--json", action="store_true", help="one JSON object per refresh instead of the table")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --follow")
    watch.add_argument("--hang-after", type=float, default=600.0,
                       help="warn when a running pod has been silent this many seconds while others log")
    watch.set_defaults(func=cmd_watch)
    return parser


def cmd_watch(args: argparse.Namespace) -> int:
    import yaml

    from trainer.kube import connect
    from trainer.watch import watch

    if args.interval <= 0 or args.hang_after <= 0:
        print("trainer: error: watch: --interval and --hang-after must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        kube = connect(args.context, args.kubeconfig)
    except yaml.YAMLError as exc:  # the kubernetes client lets a malformed kubeconfig's parser error through
        where = args.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        problem = (getattr(exc, "problem", None) or str(exc).splitlines()[0])[:200]
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"{where}: not a valid kubeconfig (YAML{f' line {mark.line + 1}' if mark else ''}: "
                         f"{problem})") from None
    namespace = args.namespace or kube.namespace or "default"
    return watch(kube, namespace, args.release, follow=args.follow, logs_mode=args.logs, as_json=args.json,
                 interval_s=args.interval, hang_after_s=args.hang_after)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None) or os.environ.get("TRAINER_LOG_LEVEL", "INFO")
    try:
        setup_logging(level)
    except ValueError as exc:
        parser.error(f"TRAINER_LOG_LEVEL: {exc}")
    if getattr(args, "workers", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        parser.error("--workers and --batch-size must be at least 1")
    if getattr(args, "max_pixels", 1) < 1:
        parser.error("--max-pixels must be at least 1")
    try:
        return int(args.func(args))
    except storage.StorageError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except InputError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `trainer ls ... | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
