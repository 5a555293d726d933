"""``peft-adaptive`` command line: inspect, plot and export saved LoRA adapters.

    peft-adaptive inspect PATH [--json]
    peft-adaptive plot PATH [-o ranks.png] [--logs TRAINER_STATE_OR_FOLDER]
    peft-adaptive export PATH OUT --format {lora,merged,lora-global-scale} [--base-model MODEL] [--force]

PATH is an adapter folder or a Hugging Face Hub repo id (with ``--revision``/``--subfolder``; the files go
to the hub cache, and ``HF_HUB_OFFLINE=1`` reads them from there).

User errors (bad path, corrupt file, unknown format, ...) print ``peft-adaptive: error: ...`` and exit with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .adapter_files import AdapterError

PROG = "peft-adaptive"


def build_parser() -> argparse.ArgumentParser:
    from .export import EXPORT_FORMATS

    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, plot and export LoRA adapters with per-module ranks (peft-adaptive)."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="print ranks per module (layers x module types), parameters and budget",
        description="Print the rank of every module as a table (layers x module types), the trainable parameters "
        "and the budget compared with plain LoRA at the starting rank r. No base model needed.",
    )
    inspect.add_argument(
        "path",
        metavar="PATH",
        help="adapter folder (with adapter_config.json and adapter_model.safetensors) or Hugging Face Hub repo id",
    )
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    _add_source_options(inspect)

    plot = commands.add_parser(
        "plot",
        help="draw a heatmap of the ranks (and of the reallocation scores, when known)",
        description="Draw a heatmap of the ranks (layers x module types). When the reallocation scores are "
        "available (saved with the adapter, in --logs, or in a trainer_state.json in PATH), a second panel "
        "shows them.",
    )
    plot.add_argument("path", metavar="PATH", help="adapter folder or Hugging Face Hub repo id")
    plot.add_argument("-o", "--output", default="ranks.png", help="image file to write (default: ranks.png)")
    plot.add_argument(
        "--logs",
        help="training logs with the scores: a trainer_state.json, a checkpoint/output folder holding one, "
        "or a JSON file with an allocation",
    )
    plot.add_argument("--dpi", type=int, default=150, help="resolution of raster images (default: 150)")
    _add_source_options(plot)

    export = commands.add_parser(
        "export",
        help="export for serving: plain LoRA, merged model, or LoRA for one-global-scale engines",
        description="Export the adapter for serving. Formats:\n"
        + "\n".join(f"  {name}: {text}" for name, text in EXPORT_FORMATS.items())
        + "\nOUT is written atomically: on failure nothing is left there.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("path", metavar="PATH", help="adapter folder or Hugging Face Hub repo id")
    export.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    export.add_argument("--format", required=True, metavar="FORMAT", help=f"one of: {', '.join(EXPORT_FORMATS)}")
    export.add_argument(
        "--base-model",
        help="base model for --format merged (local path or hub id); default: the adapter config's "
        "base_model_name_or_path",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    _add_source_options(export)
    return parser


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--revision", help="with a Hugging Face Hub repo id: the branch, tag or commit to read (default: main)"
    )
    parser.add_argument("--subfolder", help="the adapter's folder inside PATH or the hub repo")


def _hub_options(args: argparse.Namespace) -> dict:
    return {"subfolder": args.subfolder, **({"revision": args.revision} if args.revision else {})}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    try:
        return _run(args)
    except AdapterError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from .adapter_summary import inspect_adapter

        summary = inspect_adapter(args.path, **_hub_options(args))
        print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.report())
        return 0
    if args.command == "plot":
        from .adapter_summary import inspect_adapter
        from .plotting import plot_ranks

        summary = inspect_adapter(args.path, **_hub_options(args))
        output = plot_ranks(summary, args.output, logs=args.logs, dpi=args.dpi)
        print(f"wrote {output}")
        return 0
    if args.command == "export":
        from .export import export_adapter

        out = export_adapter(
            args.path, args.out, args.format, base_model=args.base_model, force=args.force, **_hub_options(args)
        )
        print(f"wrote {out} ({args.format})")
        return 0
    raise AssertionError(args.command)  # argparse only accepts the commands above


if __name__ == "__main__":
    sys.exit(main())
