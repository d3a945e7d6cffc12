"""`rkd-fast layers MODEL`: a model's module names with their output shapes at a data set's input size (one
forward of one zero batch), the names `rkd-fast train --feature-pair STUDENT:TEACHER` takes. The default feature
layer is marked."""

import dataclasses
import sys

import torch


def add_arguments(parser):
    from .datasets import DATASETS
    from .model_source import SOURCES_HELP

    parser.add_argument("model", metavar="MODEL", help=SOURCES_HELP)
    parser.add_argument("--dataset", choices=DATASETS, default="digits",
                        help="the data set the model is built for and fed at (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="imagenet, synthetic-imagenet: side of the square inputs (default: 224)")
    parser.add_argument("--weights", metavar="FILE", help="an architecture's state_dict (optional: shapes do not "
                                                          "depend on it)")
    parser.add_argument("--model-dir", metavar="DIR", help="robustbench: the model directory (default: ./models)")
    parser.add_argument("--width", type=int, help="an rkd_fast architecture's base width (default: its own)")
    parser.add_argument("--all", action="store_true", help="also the modules that did not run or return no tensor")


def describe(model, example):
    """The table's rows: (name, type, output shape) of every module, the default feature layer marked."""
    from .model_source import default_feature_layer, layer_shapes

    default = default_feature_layer(model, example)
    rows = []
    for name, kind, shape in layer_shapes(model, example):
        rows.append((name, kind, shape, name == default))
    return rows


def run(args):
    from .datasets import STREAMING_DATASETS, dataset_info
    from .teachers import load_source

    try:
        info = dataset_info(args.dataset)
        if args.image_size is not None:
            if args.dataset not in STREAMING_DATASETS or args.image_size < 1:
                raise ValueError(f"--image-size must be >= 1 and applies to {'/'.join(STREAMING_DATASETS)}")
            info = dataclasses.replace(info, input_size=(args.image_size, args.image_size))
        model, _ = load_source(args.model, info, weights=args.weights, model_dir=args.model_dir, width=args.width,
                               need_weights=False)
        example = torch.zeros(1, info.in_channels, *info.input_size)
        rows = describe(model, example)
    except (ValueError, TypeError, ImportError, OSError) as error:
        print(f"rkd-fast layers: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    shown = [r for r in rows if args.all or isinstance(r[2], tuple)]
    width = max([len(r[0]) for r in shown] + [6])
    kind_width = max([len(r[1]) for r in shown] + [4])
    print(f"{args.model} at {info.name}'s input (1, {info.in_channels}, {info.input_size[0]}, {info.input_size[1]})")
    print(f"{'module':<{width}}  {'type':<{kind_width}}  output")
    for name, kind, shape, default in shown:
        text = f"({', '.join(map(str, shape))})" if isinstance(shape, tuple) else shape
        print(f"{name:<{width}}  {kind:<{kind_width}}  {text}{'  <- default feature layer' if default else ''}")
    return 0
