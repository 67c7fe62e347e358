"""The ``deepstrf`` command line.

Each sub-command is implemented by the layer that owns it; this module only
parses arguments and imports that layer on demand, so ``deepstrf --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS = {
    "demo": "deepstrf.demo.run:main",
    "concat": "deepstrf.store.pool_commands:concat_main",
    "info": "deepstrf.store.commands:info_main",
    "verify": "deepstrf.store.commands:verify_main",
    "plot": "deepstrf.store.pool_commands:plot_main",
    "bench": "deepstrf.stream.bench:main",
    "import-nwb": "deepstrf.io.nwb_import:main",
    "versions": "deepstrf.store.version_commands:versions_main",
    "prune": "deepstrf.store.version_commands:prune_main",
    "pool-update": "deepstrf.store.version_commands:pool_update_main",
    "cite": "deepstrf.store.version_commands:cite_main",
}


EXIT_CODES = """exit codes:
  0    success (verify: no problem found)
  1    the command stopped on an error, or verify found problems; the message (what, where, what
       to do) is on stderr, without a traceback
  2    the command line is wrong (unknown command or option, missing argument)
  130  interrupted (Ctrl-C)
  141  stdout was closed before the output ended (piped into `head`, say), as a shell reports SIGPIPE"""


def _option_pairs(pairs: Sequence[str], flag: str) -> dict:
    """``["key=value", ...]`` -> dict (values parsed as JSON when possible; dotted keys nest)."""
    import json

    nested: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = nested  # client_kwargs.endpoint_url=... becomes {"client_kwargs": {"endpoint_url": ...}}
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return nested


def _storage_options(args: argparse.Namespace) -> dict | None:
    """The options of ``--options FILE`` (or the default file), ``--location-option PREFIX KEY=VALUE``
    and ``--storage-option KEY=VALUE``, later ones winning (see docs/user-guide.md)."""
    from .store.options import load_options_file, merged

    options = load_options_file(getattr(args, "options", None))
    per_prefix: dict[str, list[str]] = {}
    for prefix, pair in getattr(args, "location_option", []):
        per_prefix.setdefault(prefix, []).append(pair)
    options = merged(options, {p: _option_pairs(v, "--location-option") for p, v in per_prefix.items()})
    plain = _option_pairs(getattr(args, "storage_option", []), "--storage-option")
    return merged(options, plain) or None


def _number(kind: type, minimum: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int or float) at least ``minimum`` (above it with ``strict``); a
    value out of range is a command-line error (exit 2)."""
    what = ("a whole number" if kind is int else "a number") + (" above" if strict else " of at least") + \
        f" {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_at_least_one = _number(int, 1)
_positive = _number(float, 0, strict=True)
_not_negative = _number(float, 0)
_not_negative_int = _number(int, 0)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object in memory: no pipe
        return False
    if not hasattr(select, "poll"):  # Windows: a broken pipe there is most likely standard output's
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _column_value(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return column, value


def _dask_address(text: str) -> str:
    """An argparse type: a ``--dask`` address (``local:N`` with N at least 1, or a scheduler's)."""
    from .engine import local_workers

    try:
        local_workers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _image_file(path: str) -> str:
    """An argparse type: an image path matplotlib can write, in a folder that exists, with the
    extension it will be given (``savefig.format``, png by default, where it has none)."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    if os.path.basename(path) in ("", ".", ".."):  # a folder: savefig would write a hidden ".png" there
        raise argparse.ArgumentTypeError(f"expected the name of an image file (e.g. coverage.png), got {path!r}")
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):  # else the image, drawn, could not be written
        raise argparse.ArgumentTypeError(f"cannot write {path}: the folder {folder} does not exist; create it "
                                         "(mkdir -p) or name an image in an existing folder")
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        return f"{path}.{matplotlib.rcParams['savefig.format']}"
    # pgf needs a TeX installation, found only when the figure is written
    formats = {f: name for f, name in FigureCanvasBase.get_supported_filetypes().items() if f != "pgf"}
    if ext not in formats:
        raise argparse.ArgumentTypeError(f"cannot write .{ext} images ({path!r}); name a file ending in one of: "
                                         + ", ".join(f".{f}" for f in sorted(formats)))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepstrf", description=__doc__.splitlines()[0].replace("``", ""),
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)  # none: the usage, exit 2
    so = argparse.ArgumentParser(add_help=False)
    so.add_argument("--storage-option", "-S", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec storage option (repeatable; dotted keys nest, e.g. "
                         "client_kwargs.endpoint_url=http://127.0.0.1:5000)")
    so.add_argument("--location-option", "-L", action="append", default=[], nargs=2, metavar=("PREFIX", "KEY=VALUE"),
                    help="fsspec storage option for URLs starting with PREFIX (repeatable; the longest prefix wins)")
    so.add_argument("--options", default=None, metavar="FILE",
                    help="JSON file of storage options, per URL prefix or plain (default: $DEEPSTRF_STORAGE_OPTIONS, "
                         "else ~/.config/deepstrf/storage.json if it exists)")
    roots = argparse.ArgumentParser(add_help=False)
    roots.add_argument("--allow-root", action="append", default=[], metavar="URL",
                       help="a folder or URL prefix outside the pool's own that its references may point to "
                            "(repeatable)")
    version = argparse.ArgumentParser(add_help=False)
    version.add_argument("--version", default=None,
                         help="a source's version (fingerprint, prefix or tag; default latest)")
    from .demo import DEFAULTS

    p = sub.add_parser("demo", parents=[so], help="pool synthetic AA1/AA2/NS1-like sources, stream and fit one model")
    p.add_argument("--out", default="demo-out", help="output folder (report, figures, local stores)")
    p.add_argument("--store", default=None, help="where to write the Zarr stores (default: OUT/stores)")
    p.add_argument("--scale", type=_positive, default=None,
                   help=f"size factor for S and N (default {DEFAULTS['scale']})")
    p.add_argument("--time-scale", type=_positive, default=None,
                   help=f"size factor for T (default {DEFAULTS['time_scale']})")
    p.add_argument("--epochs", type=_at_least_one, default=None, help=f"training epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--workers", type=_not_negative_int, default=None,
                   help=f"DataLoader worker processes (default {DEFAULTS['workers']})")
    p.add_argument("--seed", type=_not_negative_int, default=0,
                   help="seed of the synthetic sources and the training (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace stores left by an earlier run")

    p = sub.add_parser("concat", parents=[so, roots], help="write a pool of store references (no data copied)")
    p.add_argument("out", help="URL of the pool to write")
    p.add_argument("sources", nargs="*", help="URLs of sources or pools, or patterns (s3://bucket/stores/*.zarr)")
    p.add_argument("--from-list", default=None, metavar="FILE",
                   help="also pool the stores listed in FILE (one URL or pattern per line; # comments)")
    p.add_argument("--name", action="append", default=None,
                   help="source label (one per source; default: the name or class name each store records)")
    p.add_argument("--overwrite", action="store_true", help="replace a pool already at OUT")

    p = sub.add_parser("info", parents=[so, roots, version], help="describe a source or pool store")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--offline", action="store_true",
                   help="a pool: read the pool only (do not ask its sources for newer versions)")

    p = sub.add_parser("verify", parents=[so, roots, version],
                       help="check a store's metadata, references and checksums")
    p.add_argument("url")
    p.add_argument("--data", action="store_true", help="also read and checksum every data chunk (sources: always)")
    p.add_argument("--dask", type=_dask_address, default=None, metavar="ADDRESS",
                   help="check every source's data, one task per source, on a Dask cluster (scheduler "
                        "address or local:N)")

    p = sub.add_parser("versions", parents=[so], help="list the versions of a source store")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("prune", parents=[so], help="remove all but the newest versions of a source store")
    p.add_argument("url")
    p.add_argument("--keep", type=_at_least_one, required=True, metavar="N",
                   help="versions to keep (the N newest, at least 1)")

    p = sub.add_parser("pool-update", parents=[so, roots],
                       help="write a pool re-pinned to its sources' latest versions")
    p.add_argument("pool", help="URL of the pool to update")
    p.add_argument("out", help="URL of the re-pinned pool to write")
    p.add_argument("--overwrite", action="store_true", help="replace a pool already at OUT")

    p = sub.add_parser("cite", parents=[so, version],
                       help="citations and licenses of a source or of every source of a pool")
    p.add_argument("url")
    p.add_argument("--bibtex", action="store_true", help="print BibTeX entries instead of text")

    p = sub.add_parser("plot", parents=[so, roots], help="plot a store's coverage matrix")
    p.add_argument("url")
    p.add_argument("-o", "--output", type=_image_file, default="coverage.png",
                   help="image to write, its format named by its extension (default coverage.png; none: .png)")

    p = sub.add_parser("bench", parents=[so, roots], help="measure streaming throughput of a store")
    p.add_argument("url", nargs="?", default=None, help="store to read (default: a synthetic pool in a temp folder)")
    p.add_argument("--batch-size", type=_at_least_one, default=8, help="items per batch (default 8)")
    p.add_argument("--workers", type=_not_negative_int, default=0,
                   help="DataLoader worker processes (default 0: read in this process)")
    p.add_argument("--epochs", type=_at_least_one, default=1, help="epochs to stream, each reported (default 1)")
    _add_import_nwb(sub, so)
    return parser


def _add_import_nwb(sub: argparse._SubParsersAction, so: argparse.ArgumentParser) -> None:
    p = sub.add_parser("import-nwb", parents=[so], help="import NWB sessions (local, s3://, https://) as source stores")
    p.add_argument("out_dir", help="folder or URL prefix; each session becomes OUT_DIR/<file stem>.zarr")
    p.add_argument("sources", nargs="*", metavar="FILE_OR_URL",
                   help="NWB files or NWB-Zarr folders (paths, s3://, https://) or patterns (s3://b/p/**/*.nwb)")
    p.add_argument("--from-list", default=None, metavar="FILE",
                   help="also import the files listed in FILE (one path, URL or pattern per line; # comments)")
    p.add_argument("--dt-ms", type=_positive, default=5.0, help="bin width in ms (default 5)")
    p.add_argument("--presentations", default="trials", help="presentation table: trials or a table in /intervals")
    p.add_argument("--stim-column", default="stim_name", help="column of that table naming the stimulus")
    p.add_argument("--stim-index-series", default=None, help="IndexSeries in /stimulus giving the stimulus instead")
    p.add_argument("--stim-series", default=None,
                   help="series presented over the session to cut stimuli from (default: /stimulus_template by name)")
    p.add_argument("--stim-dir", default=None, metavar="DIR_OR_URL",
                   help="folder of stimulus files named after the stim column's values (.wav, .flac, .npy)")
    p.add_argument("--stim-rate", type=_positive, default=None, metavar="HZ",
                   help="samples (or spectrogram frames) per second of .npy stimulus files")
    p.add_argument("--stim-kind", default="auto", choices=["auto", "waveform", "spectrogram", "video"])
    p.add_argument("--bands", type=_at_least_one, default=32, help="mel bands of waveform stimuli (default 32)")
    p.add_argument("--f-min", type=_not_negative, default=50.0, help="lowest mel band edge in Hz (default 50)")
    p.add_argument("--f-max", type=_positive, default=None, help="highest mel band edge in Hz (default fs/2)")
    p.add_argument("--window-ms", type=_positive, default=25.0, help="STFT window of waveform stimuli (default 25 ms)")
    p.add_argument("--pre-ms", type=_not_negative, default=0.0, help="time kept before each presentation's start")
    p.add_argument("--post-ms", type=_not_negative, default=0.0, help="time kept after the stimulus")
    p.add_argument("--unit-filter", action="append", default=[], type=_column_value, metavar="COLUMN=VALUE",
                   help="keep units whose COLUMN is VALUE (repeatable; values of one column are alternatives)")
    p.add_argument("--ignore-obs-intervals", action="store_true",
                   help="count every unit as recorded during the whole session")
    p.add_argument("--license", default=None, help="license written into each store's dataset card")
    where = p.add_mutually_exclusive_group()  # both choose where the sessions run
    where.add_argument("--jobs", "-j", type=_at_least_one, default=1,
                       help="files imported in parallel worker processes")
    where.add_argument("--dask", type=_dask_address, default=None, metavar="ADDRESS",
                   help="run one task per session on a Dask cluster: a scheduler address (tcp://host:8786) "
                        "or local:N for N worker processes on this machine")
    p.add_argument("--overwrite", action="store_true", help="replace stores imported with other inputs or arguments")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` (whose usage line a usage error prints)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _what_to_do(error: BaseException, args: argparse.Namespace) -> str:
    """The advice after an error of the machine, the network or an object store."""
    output = getattr(args, "output", None)  # plot's image: a local file
    if output is not None and getattr(error, "filename", None) == output:
        return (f"check that {os.path.dirname(os.path.abspath(output))} is a folder you may write into, with "
                "space left, or name another image (-o)")
    return ("check the URL or path, the endpoint and the network, and the credentials (storage options: -S, -L, "
            "--options)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.storage_options = _storage_options(args)
    except ValueError as e:  # a bad command line: argparse's exit code and the command's usage line
        _subparser(parser, args.command).error(str(e))
    module, func = COMMANDS[args.command].split(":")
    from . import errors

    expected = tuple(e for e in vars(errors).values() if isinstance(e, type) and issubclass(e, Exception))
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except errors.UsageError as e:  # before `expected`, which holds it too
        _subparser(parser, args.command).error(str(e))
    except expected as e:  # what went wrong and what to do is in the message: no traceback
        message = errors.command_line_words(str(e)) if hasattr(args, "overwrite") else str(e)
        print(f"deepstrf {args.command}: error: {message}", file=sys.stderr)
        return 1
    except errors.environment_errors() as e:  # the machine's, network's or object store's: no traceback either
        if isinstance(e, BrokenPipeError) and _stdout_gone():  # its reader left (`| head`): nothing to tell it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor to flush to it at exit
            return 141
        print(f"deepstrf {args.command}: error: {type(e).__name__}: {e}\nWhat to do: {_what_to_do(e, args)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"deepstrf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
