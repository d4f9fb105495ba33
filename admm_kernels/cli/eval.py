"""`admm-prune eval`: perplexity of a model on a text, and lm-eval tasks; for a folder written by
`admm-prune prune` the settings its report records (so eval reproduces prune's 'perplexity after').

    admm-prune eval [MODEL] --eval-text PATH
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import defaults
from ..output import REPORT_NAME
from .common import (
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_SEQLEN,
    EVAL_TEXT_DEFAULT,
    FLAGS,
    CliError,
    add_distributed_arguments,
    add_eval_text_argument,
    add_eval_windows_argument,
    add_protocol_arguments,
    add_run_arguments,
    add_stream_argument,
    add_task_arguments,
    deprecated_alias,
    flag_wording,
    logger,
    positive,
    task_settings,
)


def add_parser(sub) -> None:
    """The `eval` subcommand and its options."""
    ev = sub.add_parser("eval", allow_abbrev=False,
                        help="perplexity of a model on a text, lm-eval zero-shot tasks (default: the "
                             "embedded SmolLM2-135M)",
                        description=(
        "Perplexity of a causal LM: exp(mean next-token loss) over non-overlapping windows of --seqlen "
        "tokens, with a progress bar over the windows. MODEL may be a transformers folder or a packed "
        "folder (prune --save-format packed). Defaults: for a folder written by `admm-prune prune`, the "
        "--seqlen, --eval-windows, --eval-text and --protocol its report records (so eval reproduces prune's "
        "'perplexity after'; a recorded text that is missing or whose content changed, or a damaged report, "
        "is an error: give the options to choose on purpose); for the embedded model "
        f"{EMBEDDED_EVAL_WINDOWS} windows of {EMBEDDED_SEQLEN} tokens, as "
        "prune uses; otherwise every window of 2048 tokens (clipped to the model's maximum)."))
    ev.add_argument("model", nargs="?", default=None,
                    help="local transformers model folder or packed folder (default: the embedded "
                         "SmolLM2-135M)")
    add_eval_text_argument(ev, "evaluation text: file, folder, .jsonl or saved dataset (default: what "
                               "MODEL's prune report records, else held-out Shakespeare plays)", old="--text")
    ev.add_argument("--seqlen", type=positive("--seqlen"), default=None,
                    help=f"tokens per window (default: see above; {EMBEDDED_SEQLEN} for the embedded model)")
    add_eval_windows_argument(ev, ", or what MODEL/prune_report.json records; --max-windows is a "
                                  "deprecated alias")
    ev.add_argument("--max-windows", type=positive("--max-windows"), dest="eval_windows",
                    action=deprecated_alias("--eval-windows"), help=argparse.SUPPRESS)
    add_run_arguments(ev, "no progress bars or log lines")
    add_stream_argument(ev, "the model is evaluated block by block, each block read from MODEL's safetensors "
                            "shards and freed, so a model larger than memory can be evaluated")
    add_distributed_arguments(ev)
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.add_argument("--report", metavar="FILE", default=None, help="also write the JSON result to FILE")
    add_protocol_arguments(ev)
    add_task_arguments(ev)


class _Report:
    """What `admm-prune eval MODEL` takes from MODEL/prune_report.json: each setting checked when it is used,
    so a bad field is named as the report's field, not as a flag the user never passed."""

    def __init__(self, path: Path, ppl: dict):
        self.path, self.ppl = path, ppl

    def field(self, key: str, ok, expected: str, flag: str):
        value = self.ppl.get(key)
        if value is not None and not ok(value):
            raise CliError(f"{str(self.path)!r}: field perplexity.{key} is {value!r}, not {expected}; fix "
                           f"the report, or give {flag} to choose the setting yourself")
        return value


def _eval_report(args, want_ppl: bool, log) -> _Report | None:
    """MODEL's prune report (its perplexity settings), None when MODEL is no prune output. A report that
    cannot be read is an error naming it, unless every setting it would give is given."""
    from ..run import is_prune_report

    if args.model is None:
        return None
    path = Path(args.model).expanduser() / REPORT_NAME
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except (OSError, ValueError) as exc:
        given = (args.seqlen, args.eval_windows, args.eval_path, args.protocol)
        if not want_ppl or all(v is not None for v in given):
            log(f"admm-prune: ignoring {str(path)!r}, which cannot be read ({exc}): every setting is given")
            return None
        raise CliError(f"{str(path)!r} is damaged ({exc}); it records how prune evaluated this model: "
                       "restore it, or give --seqlen, --eval-windows, --eval-text (PATH, or "
                       f"{EVAL_TEXT_DEFAULT} for the default) and --protocol to evaluate without it") \
            from None
    if not is_prune_report(report):
        return None
    ppl = report.get("perplexity")
    if ppl is None:
        ppl = {}
    if not isinstance(ppl, dict):
        raise CliError(f"{str(path)!r}: field perplexity is {ppl!r}, not an object; fix the report, or give "
                       "--seqlen, --eval-windows, --eval-text and --protocol")
    return _Report(path, ppl)


def _recorded_text(rep: _Report) -> str | None:
    """The evaluation text the prune run used, checked to be the same content (None: the default)."""
    from .. import data

    recorded = rep.field("text", lambda v: isinstance(v, str) and v, "a path", "--eval-text")
    digest = rep.field("text_sha256", lambda v: isinstance(v, str), "a sha256 hex digest", "--eval-text")
    if recorded in (None, EVAL_TEXT_DEFAULT):
        return None
    p = Path(recorded).expanduser()
    if not p.exists():
        raise CliError(f"the evaluation text {recorded!r} recorded in {str(rep.path)!r} is not found here"
                       + (" (a relative path, recorded by an older version: run eval from the folder prune "
                          "ran in)" if not p.is_absolute() else "")
                       + "; give --eval-text PATH to evaluate on another text on purpose")
    if digest is not None:
        now = data.text_digest(p)
        if now != digest:
            raise CliError(f"the evaluation text {recorded!r} recorded in {str(rep.path)!r} has changed "
                           f"since the prune run (sha256 {now[:12]}..., recorded {digest[:12]}...); give "
                           f"--eval-text {recorded} to evaluate on it as it is now, or another --eval-text")
    return recorded


def _check_report_path(report: str | None) -> None:
    """--report FILE must be writable before any work: a run must not end without its result."""
    from .._io import unwritable_reason

    if report is None:
        return
    p = Path(report).expanduser()
    if p.is_dir():
        raise CliError(f"--report {report!r} is a folder; name a file")
    folder = p.absolute().parent
    if not folder.is_dir():
        raise CliError(f"--report {report!r} cannot be written: its folder {str(folder)!r} does not exist")
    reason = unwritable_reason(f"--report {report!r}", folder)
    if reason is not None:
        raise CliError(reason)


class _Settings(argparse.Namespace):
    """eval's resolved window length, windows and text, and where they came from (for the log line)."""


def _settings(args, rep: _Report | None, comm) -> _Settings:
    """The explicit options first; else what MODEL's prune report recorded (its evaluation text only if it
    is still there with the same content: an error otherwise); else the embedded model's defaults (as
    prune uses them). Sets args.protocol / corpus / text_field."""
    from .. import protocols
    from ..run import Frontend, resolve_protocol

    explicit_protocol, recorded = args.protocol is not None, "default"
    s = _Settings(seqlen=args.seqlen, windows=args.eval_windows, source="",
                  text=None if args.eval_path == EVAL_TEXT_DEFAULT else args.eval_path)
    if args.model is None:
        s.seqlen = s.seqlen or defaults.EMBEDDED_SEQLEN
        s.windows = s.windows or defaults.EMBEDDED_EVAL_WINDOWS
        s.source = "the embedded model's defaults"
    elif rep is not None and rep.ppl:
        s.source = str(rep.path)
        recorded = rep.field("protocol", lambda v: v in protocols.PROTOCOLS,
                             f"one of {protocols.PROTOCOLS}", "--protocol") or "default"
        if not explicit_protocol:  # as the prune run that wrote MODEL evaluated it
            args.protocol = recorded
            if recorded == "sparsegpt":
                args.corpus = args.corpus or rep.field("corpus", lambda v: v in protocols.CORPORA,
                                                       f"one of {protocols.CORPORA}", "--corpus")
        if args.text_field is None:
            args.text_field = rep.field("text_field", lambda v: isinstance(v, str) and v, "a field name",
                                        "--text-field")
        if s.seqlen is None:
            s.seqlen = rep.field("seqlen", lambda v: type(v) is int and v >= 2, "an int >= 2", "--seqlen")
        if s.windows is None:
            s.windows = rep.field("windows", lambda v: type(v) is int and v >= 1, "an int >= 1",
                                  "--eval-windows")
        if args.eval_path is None and comm.is_main:
            s.text = _recorded_text(rep)
    with flag_wording():
        args.protocol, args.corpus, args.text_field = resolve_protocol(args.protocol, args.corpus,
                                                                       args.text_field, Frontend(names=FLAGS))
    if args.protocol != recorded and args.eval_windows is None:
        s.windows = None  # another protocol than the recorded one: its own windows (sparsegpt: every one)
    return s


def _perplexity(args, s: _Settings, model, tok, device, comm, log) -> dict:
    """The perplexity part of eval's result."""
    import time

    from .. import data, protocols
    from ..eval import evaluate_perplexity
    from ..models import max_positions

    net = model.model if args.stream else model
    try:
        seqlen = data.resolve_seqlen(s.seqlen, max_positions(net), name="--seqlen")

        def tokenise():
            return protocols.evaluation_tokens(tok, s.text, protocol=args.protocol, corpus=args.corpus,
                                               seqlen=seqlen, field=args.text_field)
        ids = comm.decided_by_main(tokenise, "tokenising")
        n_win = ids.numel() // seqlen
        n_win = min(n_win, s.windows or n_win)
        hint = (f" (settings from {s.source}; --seqlen / --eval-windows change them)" if s.source else
                " (--eval-windows N evaluates fewer)" if s.windows is None else "")
        log(f"evaluating {n_win} windows x {seqlen} tokens of {s.text or EVAL_TEXT_DEFAULT} "
            f"(protocol {args.protocol}){hint}")
        t = time.perf_counter()
        ppl = evaluate_perplexity(model, ids, seqlen=seqlen, max_windows=s.windows, device=device,
                                  progress=not args.quiet and comm.is_main, distributed=comm)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    return {"text": s.text or EVAL_TEXT_DEFAULT, "seqlen": seqlen, "windows": n_win, "perplexity": ppl,
            "seconds": time.perf_counter() - t, "protocol": args.protocol,
            "corpus": args.corpus if args.protocol == "sparsegpt" else None,
            "computed": protocols.describe(args.protocol, args.corpus)}


def cmd_eval(args, comm=None) -> int:
    """`admm-prune eval`; under torchrun (comm) the windows are split over the ranks, rank 0 tokenises
    and prints."""
    import time

    from ..models.distributed import LOCAL
    from ..run import Frontend, check_device, check_model, check_text_path, load, resolve_tasks, run_tasks

    comm = comm or LOCAL
    log = logger(args.quiet or not comm.is_main)
    frontend = Frontend(names=FLAGS)
    with flag_wording():
        device = check_device(args.device, "--device")
        if comm.is_main:
            if args.eval_path != EVAL_TEXT_DEFAULT:  # the held-out plays, chosen explicitly
                check_text_path(args.eval_path, "--eval-text")
            _check_report_path(args.report)
        check_model(args.model, "MODEL", packed=not args.stream)
        tasks = task_settings(args)
        task_names = resolve_tasks(tasks, frontend)
    if task_names and (args.stream or comm.distributed):
        raise CliError("--tasks runs lm-evaluation-harness on a model in memory in one process: not with "
                       "--stream or under torchrun")
    # Perplexity unless only tasks were asked for (--tasks without --eval-text or --protocol).
    want_ppl = task_names is None or args.eval_path is not None or args.protocol is not None
    settings = _settings(args, _eval_report(args, want_ppl, log) if want_ppl else None, comm)
    t = time.perf_counter()
    with flag_wording():
        model, tok, path = load(args.model, device, args.dtype, frontend, packed=not args.stream,
                                stream=args.stream)
    log(f"loaded {path} in {time.perf_counter() - t:.1f} s")
    if tok is None and comm.is_main:
        raise CliError(f"model folder {str(path)!r} has no tokenizer, needed to tokenize text")
    result: dict = {"model": str(path)}
    if want_ppl:
        result.update(_perplexity(args, settings, model, tok, device, comm, log))
    if task_names:
        with flag_wording():
            result["tasks"] = run_tasks(model, tok, tasks, task_names, device, log)
    if comm.is_main:
        _print_result(args, result, want_ppl, task_names)
    return 0


def _print_result(args, result: dict, want_ppl: bool, task_names) -> None:
    """The result first: a --report that fails to be written must not take the printed result with it."""
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        if want_ppl:
            print(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows x {result['seqlen']} "
                  f"tokens of {result['text']}, protocol {args.protocol})", flush=True)
        if task_names:
            from ..integrations.lm_eval import format_table
            print(format_table(result["tasks"]), flush=True)
    if args.report:
        from .._io import atomic_write_bytes, write_error
        try:
            atomic_write_bytes(Path(args.report), (json.dumps(result, indent=2) + "\n").encode())
        except OSError as exc:
            error = write_error(exc, "--report", args.report)
            raise CliError(f"{error} (the result is printed above)") from None
