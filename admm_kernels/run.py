"""One pruning run as a library call: load a causal LM (a transformers folder, or the embedded SmolLM2
default), prune it block by block, measure perplexity (and lm-eval tasks) before and after, and publish the
result as a folder with a JSON report. `admm-prune prune` is this run behind flags (admm_kernels.cli).

    import admm_kernels as ak

    result = ak.run_prune("models/llama", ak.OutputSettings("out/llama-50", resume=True), sparsity=0.5)
    result.report["perplexity"], result.out

What a run owns, in order: its output checked (not the input model, empty unless replacing is allowed,
writable) and locked (OUT.state/.lock, one run per output), what a killed run left beside it tidied, the
texts tokenised on rank 0, the free space checked, perplexity and tasks before (cached in the state: a
resumed run reuses them when what they depend on is unchanged), prune_model (block states saved in
OUT.state, so an interrupted run resumes), perplexity and tasks after, and the atomic publishing of the
folder (admm_kernels.output), after which the state is deleted.

Inputs are small frozen dataclasses (TextSettings, TaskSettings, OutputSettings, Placement, Frontend)
plus the prune settings: an admm_kernels.PruneConfig, or a mapping of its (prune_model's) keyword
arguments. Errors are RunError (a ValueError) naming the Python arguments; a front end words them its own
way by passing a table argument -> its name (Frontend.names: the command line passes its flags).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from . import defaults
from .defaults import CALIB_TEXT_DEFAULT, EVAL_TEXT_DEFAULT
from .output import REPORT_NAME, DtypeNote

if TYPE_CHECKING:  # models/ imports transformers; a run imports it only when it starts
    from .models.config import PruneConfig
    from .models.distributed import Comm

LIBRARY_COMMAND = "admm_kernels.run_prune"  # the report's "command" of a run started from Python
PERPLEXITY_CACHE = "run.json"               # state extras: perplexity before, and task results before
TASKS_CACHE = "run-tasks.json"

# How messages name each argument by default (the Python API's wording); Frontend.names overrides it.
PYTHON_NAMES = MappingProxyType({
    "overwrite": "overwrite=True", "resume": "resume=True", "stream": "stream=True",
    "evaluate_tasks": "admm_kernels.evaluate_tasks",
})


class RunError(ValueError):
    """A run refused its inputs or could not do its work; the message names the arguments (as
    Frontend.names words them) and what to do."""


class PruneSettingsError(RunError):
    """prune_model (or its early check) refused the prune settings; the message is prune_model's, naming
    its keyword arguments. per_block: the sparsity was a list (one value per block)."""

    def __init__(self, message: str, per_block: bool, cause: Exception | None = None):
        super().__init__(message)
        self.per_block = per_block
        self.cause = cause  # what prune_model raised: its `.argument`, or a StateError's details


@dataclass(frozen=True)
class TextSettings:
    """The calibration and evaluation texts and how they become windows (admm_kernels.protocols)."""

    calib: str | None = None          # file, folder, .jsonl or saved dataset; None: Shakespeare plays
    eval_text: str | None = None      # None: held-out Shakespeare plays
    evaluate: bool = True             # perplexity before and after
    nsamples: int | None = None       # calibration windows (None: 128; 32 for the embedded model)
    seqlen: int | None = None         # tokens per window (None: 2048 clipped to the model; 256 embedded)
    eval_windows: int | None = None   # at most this many evaluation windows (None: all; 32 embedded)
    protocol: str = "default"         # "default" or "sparsegpt"
    corpus: str | None = None         # with sparsegpt: "wikitext2" (None) or "c4"
    text_field: str = "text"          # field holding the text in JSON-lines, JSON and datasets sources
    seed: int = 0                     # seed of the calibration window draw


@dataclass(frozen=True)
class TaskSettings:
    """lm-evaluation-harness tasks run before and after pruning (the `eval` extra)."""

    tasks: str | tuple[str, ...]      # comma-separated names or a tuple of names
    tasks_path: str | None = None     # folder of local task YAMLs
    num_fewshot: int = 0
    limit: int | None = None          # only the first N documents of each task


@dataclass(frozen=True)
class OutputSettings:
    """Where the pruned model is published and what may happen to what is there."""

    out: str | os.PathLike            # the output folder; its state lives in OUT.state while running
    overwrite: bool = False           # replace a non-empty folder (and discard an interrupted run's state)
    resume: bool = False              # continue an interrupted run from its last finished block
    save_format: str = "hf"           # "hf": transformers safetensors; "packed": admm_kernels.sparse
    replace_previous: bool = False    # replace an earlier prune output in `out` (not any other content)


@dataclass(frozen=True)
class Placement:
    """Where the model and its activations live, and the processes sharing the work."""

    device: str = "cpu"               # compute device, e.g. "cpu", "cuda:1"
    dtype: str | None = None          # load dtype (None: float32 on the CPU, "auto" elsewhere)
    offload: bool = False             # calibration activations in host memory
    offload_dir: str | None = None    # ... or in a file in this folder (implies offload)
    stream: bool = False              # read each block from the checkpoint just before its turn
    comm: Comm | None = None          # the process group's Comm under torchrun; None: this process alone


def _log_to_logging(line: str) -> None:
    logging.getLogger(__name__).info(line)


@dataclass(frozen=True)
class Frontend:
    """How the run talks to whoever started it."""

    log: Callable[[str], None] = _log_to_logging  # one progress line at a time
    progress: bool = False                          # tqdm bars (blocks, windows)
    names: Mapping[str, str] = field(default_factory=dict)  # argument -> how messages call it
    command: str = LIBRARY_COMMAND                  # recorded as the report's "command"
    program: str | None = None                      # prefix of notes ("admm-prune: ...")

    def name(self, argument: str) -> str:
        """How messages call `argument` (e.g. "out" -> "--out" for the command line)."""
        return self.names.get(argument, PYTHON_NAMES.get(argument, argument))

    def note(self, line: str) -> None:
        self.log(f"{self.program}: {line}" if self.program else line)


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced; on ranks other than 0 of a distributed run nothing is published."""

    report: dict                      # the report written to out/prune_report.json
    out: Path                         # the output folder
    model_path: Path                  # the input model's folder
    published: bool                   # this process wrote the folder (rank 0)
    dtype_note: DtypeNote | None = None  # when the output's weights have another dtype than the input's


def is_prune_report(report: object) -> bool:
    """Whether a parsed prune_report.json was written by a prune run (the command line's or Python's)."""
    command = str(report.get("command", "")) if isinstance(report, dict) else ""
    return command.startswith("admm-prune prune") or command.startswith(LIBRARY_COMMAND)


def prune_output_report(folder: Path) -> dict | None:
    """The report of a prune run's output folder, or None when `folder` is not one."""
    import json

    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if is_prune_report(report) else None


# --- checks shared with the command line's eval ---------------------------------------------------------

def check_device(device: object, name: str = "device"):
    """The torch.device to compute on; RunError when this machine cannot run kernels there."""
    from ._checks import check_compute_device
    try:
        return check_compute_device(device, name)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def check_model(model: str | os.PathLike | None, name: str = "model", packed: bool = False) -> None:
    """A model folder that exists and holds a transformers model (or a packed one); None: embedded."""
    from .models.loading import check_model_path
    if model is not None:
        try:
            check_model_path(model, name=name, packed=packed)
        except (FileNotFoundError, ValueError) as exc:
            raise RunError(str(exc)) from None


def check_text_path(path: str | None, name: str) -> None:
    """An existing text source whose beginning decodes as text: checked before the model is loaded."""
    from .data import check_text_source

    if path is None:
        return
    if not Path(path).expanduser().exists():
        raise RunError(f"{name} path {path!r} does not exist")
    try:
        check_text_source(path)
    except ValueError as exc:
        raise RunError(f"{name}: {exc}") from None


def resolve_protocol(protocol: str | None, corpus: str | None, text_field: str | None,
                     frontend: Frontend) -> tuple[str, str, str]:
    """(protocol, corpus, text_field) with their defaults; a corpus only with the sparsegpt protocol."""
    protocol = protocol or "default"
    if corpus is not None and protocol != "sparsegpt":
        raise RunError(f"{frontend.name('corpus')} {corpus} applies to {frontend.name('protocol')} "
                       "sparsegpt only")
    return protocol, corpus or "wikitext2", text_field or "text"


def resolve_tasks(tasks: TaskSettings | None, frontend: Frontend) -> list[str] | None:
    """The task names resolved by lm-eval (and tasks_path) before the model is loaded, or None."""
    if tasks is None:
        return None
    if tasks.num_fewshot < 0:
        raise RunError(f"{frontend.name('num_fewshot')} must be >= 0, got {tasks.num_fewshot}")
    try:
        from .integrations.lm_eval import check_tasks
        return check_tasks(tasks.tasks, tasks.tasks_path, name=frontend.name("tasks"))
    except ImportError as exc:
        raise RunError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise RunError(str(exc).replace("tasks_path ", f"{frontend.name('tasks_path')} ")) from None


def run_tasks(model, tokenizer, tasks: TaskSettings, names: list[str], device, log) -> dict:
    """lm-eval's results of the tasks `names` on a model in memory (admm_kernels.evaluate_tasks)."""
    from .integrations.lm_eval import evaluate_tasks

    t = time.perf_counter()
    try:
        result = evaluate_tasks(model, tokenizer, names, tasks_path=tasks.tasks_path,
                                num_fewshot=tasks.num_fewshot, limit=tasks.limit, device=device)
    except (ValueError, TypeError) as exc:
        raise RunError(str(exc)) from None
    log(f"lm-eval tasks {','.join(names)}: {time.perf_counter() - t:.1f} s")
    return result


def load(model: str | os.PathLike | None, device, dtype: str | None, frontend: Frontend,
         packed: bool = False, stream: bool = False, output: Path | None = None):
    """(model, tokenizer or None, path); with stream a StreamedModel writing to `output` (if given)."""
    from .models.loading import default_model_path, load_model, load_tokenizer

    check_model(model, frontend.name("model"), packed)
    dtype = dtype or ("float32" if device.type == "cpu" else "auto")
    try:
        if not stream:
            return load_model(model, dtype=dtype, packed=packed)
        from .models.streaming import StreamedModel

        path = default_model_path() if model is None else Path(model)
        streamed = StreamedModel(path, dtype=dtype, output=output)
        return streamed, load_tokenizer(streamed.path), streamed.path
    except (ValueError, FileNotFoundError) as exc:
        raise RunError(str(exc)) from None


def _text_record(path: str | None, default: str) -> tuple[str, str | None]:
    """(absolute path or the default's name, sha256 content digest or None) of a text, for the report: a
    relative path would name another file, or none, when `eval OUT` runs in another folder."""
    from .data import text_digest

    if path is None:
        return default, None
    return os.path.abspath(os.path.expanduser(path)), text_digest(path)


# --- the run ------------------------------------------------------------------------------------------

class PruneRun:
    """One prune run: `PruneRun(...).run()` -> RunResult. See the module docstring for its steps.

    model: a transformers model folder, or None for the embedded SmolLM2-135M. output: where and how the
    result is published. prune: the prune settings, an admm_kernels.PruneConfig or a mapping of its
    (prune_model's) keyword arguments (sparsity, pattern, method, layers, sparsity_profile, owl_m,
    owl_lambda, sequential, tune_*, moe_calibration, method options such as preset or iters).
    texts / placement / tasks / frontend: see their classes."""

    def __init__(self, model: str | os.PathLike | None, output: OutputSettings,
                 prune: PruneConfig | Mapping[str, object] | None = None,
                 texts: TextSettings = TextSettings(), placement: Placement = Placement(),
                 tasks: TaskSettings | None = None, frontend: Frontend = Frontend()):
        from .models.distributed import LOCAL

        self.model_arg = None if model is None else str(model)
        self.output, self.texts, self.placement, self.tasks = output, texts, placement, tasks
        from .models.config import PruneConfig

        self.config = prune if isinstance(prune, PruneConfig) else PruneConfig(**(prune or {}))
        self.frontend = frontend
        self.comm = placement.comm or LOCAL
        self.out = Path(output.out)
        # activations: on the device, in host memory, or in a file in offload_dir
        self.offload = "disk" if placement.offload_dir is not None else placement.offload
        self.calib = None if texts.calib == CALIB_TEXT_DEFAULT else texts.calib
        self.eval_text = None if texts.eval_text == EVAL_TEXT_DEFAULT else texts.eval_text
        self._built: Path | None = None   # a streamed run's output folder in the making (rank 0)
        self._t0 = 0.0

    # -- names ---------------------------------------------------------------------------------------

    def _n(self, argument: str) -> str:
        return self.frontend.name(argument)

    @property
    def _per_block(self) -> bool:
        return isinstance(self.config.sparsity, list | tuple)

    def _settings_error(self, exc: Exception) -> PruneSettingsError:
        return PruneSettingsError(str(exc), self._per_block, exc)

    # -- before any work (every rank: the same answer everywhere) -------------------------------------

    def _validate(self) -> None:
        """The checks that need no model: a typo fails in a second, not after an hour."""
        from .models.sparsity_profile import check_profile
        from .patterns import parse_pattern, pattern_group

        check_model(self.model_arg, self._n("model"))
        config = self.config
        pattern = config.pattern
        try:  # syntax only here (M must divide in_features: checked per layer once the model is loaded)
            parse_pattern(pattern, pattern_group(pattern), name=self._n("pattern"))
        except ValueError as exc:
            raise RunError(str(exc)) from None
        if self.placement.stream and self.output.save_format == "packed":
            raise RunError(f"{self._n('stream')} writes a transformers folder block by block; "
                           f"{self._n('save_format')} packed needs the whole model in memory: drop one of "
                           "them")
        if self.tasks is not None and (self.placement.stream or self.comm.distributed):
            raise RunError(f"{self._n('tasks')} runs lm-evaluation-harness on a model in memory in one "
                           f"process: not with {self._n('stream')} or under torchrun (evaluate the pruned "
                           f"folder with {self._n('evaluate_tasks')})")
        try:  # all but the list's length (the model's number of blocks is not known yet)
            check_profile(config.sparsity, config.sparsity_profile,
                          len(config.sparsity) if self._per_block else 1, pattern, config.owl_m,
                          config.owl_lambda)
        except (ValueError, TypeError) as exc:
            raise self._settings_error(exc) from None
        if config.sparsity_profile == "owl" and self.placement.stream:
            raise RunError(f"{self._n('sparsity_profile')} owl needs a dense pass over every block before "
                           f"pruning, which {self._n('stream')} does not support yet; give the block "
                           "sparsities as a list instead")
        self.device = check_device(self.placement.device, self._n("device"))
        self.protocol, self.corpus, self.text_field = resolve_protocol(
            self.texts.protocol, self.texts.corpus, self.texts.text_field, self.frontend)
        self.task_names = resolve_tasks(self.tasks, self.frontend)

    def _check_out(self, overwrite: bool, model_dir: Path, state_dir: Path) -> None:
        """Refuse, before any work, an output that would replace or lie inside the input model (even with
        overwrite), that is not a folder, is not empty, or cannot be written (a real probe: /proc and
        read-only mounts fool os.access)."""
        from ._io import nearest_existing, paths_overlap, unwritable_reason

        out, n_out = self.out, self._n("out")
        if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise RunError(f"{n_out} {str(out)!r} is the current folder or above it; name a folder of its "
                           "own")
        for what, path in ((n_out, out), (f"its state folder {str(state_dir)!r} of {n_out}", state_dir)):
            if paths_overlap(path, model_dir):
                raise RunError(f"{what} {str(out)!r} ({str(out.resolve())!r}) and the input "
                               f"{self._n('model')} {str(model_dir)!r} ({str(model_dir.resolve())!r}) are "
                               "the same folder or one contains the other: writing there would replace the "
                               f"input model; choose another {n_out}")
        if out.exists() and not out.is_dir():
            raise RunError(f"{n_out} {str(out)!r} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise RunError(f"{n_out} {str(out)!r} is not empty; pass {self._n('overwrite')} to replace it")
        reason = unwritable_reason(f"{n_out} {str(out)!r}", nearest_existing(out.absolute().parent))
        if reason is not None:
            raise RunError(reason)

    def _prepare(self, overwrite: bool, state_dir: Path) -> list:
        """Rank 0: the texts, the offload folder and the output checked, the output's lock taken."""
        from ._io import probe_writable, write_error
        from .models.loading import default_model_folder
        from .models.state import PipelineState, StateError

        check_text_path(self.calib, self._n("calib"))
        check_text_path(self.eval_text, self._n("eval_text"))
        offload_dir = self.placement.offload_dir
        if offload_dir is not None and not Path(offload_dir).is_dir():
            raise RunError(f"{self._n('offload_dir')} {offload_dir!r} is not an existing folder")
        if offload_dir is not None:  # a real probe, as for the output: read-only mounts fool os.access
            error = probe_writable(offload_dir)
            if error is not None:
                raise RunError(str(write_error(error, self._n("offload_dir"), offload_dir)))
        model_dir = Path(self.model_arg) if self.model_arg else default_model_folder()
        self._check_out(overwrite, model_dir, state_dir)
        try:  # one run at a time per output: the lock on OUT.state covers the state and the final save
            return [PipelineState(state_dir).lock()]
        except StateError as exc:
            raise RunError(f"{self._n('out')} {str(self.out)!r} cannot be used: {exc}") from None

    def run(self) -> RunResult:
        """Do the run; RunError (a ValueError) for a refused input, WriteError (an OSError) for a failed
        write; a stopped run (KeyboardInterrupt, admm_kernels._signals.Terminated) leaves its state for
        resume."""
        import contextlib

        from .models import default_state_dir
        from .models.state import PipelineState

        self._validate()
        previous = self.output.replace_previous and prune_output_report(self.out) is not None
        overwrite = self.output.overwrite or previous
        state_dir = default_state_dir(self.out)
        held: list = []  # rank 0's lock (the other ranks only hear whether rank 0's checks passed)
        self.comm.decided_by_main(lambda: held.extend(self._prepare(overwrite, state_dir)),
                                  f"checking {self._n('out')}")
        with held[0] if held else contextlib.nullcontext():
            return self._locked(PipelineState(state_dir), overwrite, previous)

    # -- with the lock held --------------------------------------------------------------------------

    def _tidy(self, store, overwrite: bool, previous: bool) -> None:
        """Rank 0: what a killed run left beside the output, and the state of an interrupted one."""
        from ._io import clean_stale_siblings, make_temp_sibling, writing

        out = self.out
        for line in clean_stale_siblings(out.resolve()):
            self.frontend.note(line)
            if out.is_dir() and any(out.iterdir()) and not overwrite:  # a previous output came back
                raise RunError(f"{line}; {self._n('out')} {str(out)!r} is not empty now: pass "
                               f"{self._n('overwrite')} to replace it")
        if store.has_state() and not self.output.resume:
            if not self.output.overwrite:  # never throw away hours of work because resume was forgotten
                raise RunError(f"{str(store.folder)!r} holds the state of an interrupted run: pass "
                               f"{self._n('resume')} to continue it, or {self._n('overwrite')} to start over")
            store.clear()
        if previous:
            self.frontend.log(f"replacing the previous output in {out} (give {self._n('out')} to keep it)")
        if self.placement.stream:  # the streamed shards are written here as the blocks are pruned
            with writing(self._n("out"), out):
                out.resolve().parent.mkdir(parents=True, exist_ok=True)
                self._built = make_temp_sibling(out.resolve())

    def _locked(self, store, overwrite: bool, previous: bool) -> RunResult:
        from ._io import WriteError

        try:
            self.comm.decided_by_main(lambda: self._tidy(store, overwrite, previous),
                                      f"preparing {self._n('out')}")
            return self._work(store, overwrite)
        except WriteError as exc:  # the state, a streamed block, the activation file: one line, what to do
            hint = (f"; then rerun with {self._n('resume')} to continue from the last finished block"
                    if self.comm.is_main and store.exists() else "")
            raise RunError(f"{exc}{hint}") from None
        finally:
            if self._built is not None:  # renamed into place on success: a failed run's folder is removed
                shutil.rmtree(self._built, ignore_errors=True)

    def _load(self) -> None:
        """The model on every rank, the window length, and prune_model's checks on this model."""
        from . import data
        from .models import max_positions

        stream, embedded = self.placement.stream, self.model_arg is None
        self.model, self.tok, self.path = load(self.model_arg, self.device, self.placement.dtype,
                                               self.frontend, stream=stream, output=self._built)
        self.net = self.model.model if stream else self.model
        how = ", streamed: blocks read when needed" if stream else ""
        self.frontend.log(f"loaded {self.path} ({sum(p.numel() for p in self.net.parameters()) / 1e6:.1f} M "
                          f"parameters{how}) in {time.perf_counter() - self._t0:.1f} s")
        seqlen = self.texts.seqlen if self.texts.seqlen or not embedded else defaults.EMBEDDED_SEQLEN
        try:
            self.seqlen = data.resolve_seqlen(seqlen, max_positions(self.net), name=self._n("seqlen"))
        except ValueError as exc:
            raise RunError(str(exc)) from None
        try:
            self.config.validate(self.model)
        except (ValueError, TypeError) as exc:
            raise self._settings_error(exc) from None

    def _tokenise(self) -> tuple:
        """Rank 0 reads the texts: (calibration windows, evaluation tokens or None, text records)."""
        from . import protocols

        tok, texts, seqlen = self.tok, self.texts, self.seqlen
        try:
            if tok is None:
                raise RunError(f"model folder {str(self.path)!r} has no tokenizer, needed to tokenize text")
            t = time.perf_counter()
            calib = protocols.calibration_windows(tok, self.calib, nsamples=self.nsamples, seqlen=seqlen,
                                                  seed=texts.seed, protocol=self.protocol,
                                                  field=self.text_field)
            eval_ids = None if not texts.evaluate else protocols.evaluation_tokens(
                tok, self.eval_text, protocol=self.protocol, corpus=self.corpus, seqlen=seqlen,
                field=self.text_field)
            # what eval OUT needs to evaluate the same text, or to say that it cannot
            records = {"calib": _text_record(self.calib, CALIB_TEXT_DEFAULT),
                       "eval": _text_record(self.eval_text if texts.evaluate else None, EVAL_TEXT_DEFAULT)}
            self.frontend.log(f"tokenised: {self.nsamples} calibration windows of {seqlen} tokens"
                              + ("" if eval_ids is None else f", {eval_ids.numel()} evaluation tokens")
                              + f" ({time.perf_counter() - t:.1f} s)")
            if eval_ids is not None and eval_ids.numel() < seqlen:
                raise RunError(f"evaluation text is too short: found {eval_ids.numel()} tokens, need at "
                               f"least {self._n('seqlen')} = {seqlen} tokens for one window")
        except (ValueError, TypeError, FileNotFoundError) as exc:
            raise RunError(str(exc)) from None
        return calib, eval_ids, records

    def _check_space(self, store) -> None:
        """Refuse, before any pruning, a run whose output, state or activation file cannot fit its disk."""
        from ._io import WriteError, check_free_space
        from .output import SpacePlan, space_needed

        plan = SpacePlan(self.nsamples, self.seqlen, 0 if self.eval_ids is None else self.eval_ids.numel(),
                         self.eval_windows)
        names = {"out": self._n("out"), "offload_dir": self._n("offload_dir")}
        try:
            check_free_space(space_needed(self.model, self.out, self.output.save_format, store.folder,
                                          self.placement.offload_dir, plan, names))
        except WriteError as exc:
            raise RunError(str(exc)) from None

    def _read_cache(self, store, name: str, what: str) -> dict:
        """What write_extra(name) stored for resume, or {} (not resuming; a damaged cache is ignored)."""
        from .models.state import StateError

        try:
            return (store.read_extra(name) if self.output.resume else None) or {}
        except StateError as exc:  # only a cache: recompute it
            self.frontend.note(f"ignoring the cached {what}: {exc}")
            return {}

    def _digest(self) -> str:
        from ._digest import model_digest

        return self.model.digest() if self.placement.stream else model_digest(self.model)

    def _perplexity_before(self, store) -> float:
        """The dense model's perplexity; on resume the cached one when computed on the same tokens, windows
        and window length, by the same dense model (content digest: 0.4 s for SmolLM2-135M), thread count,
        device and versions."""
        import torch

        from .environment import versions
        from .eval import evaluate_perplexity

        def cached():
            key = {"tokens_sha256": hashlib.sha256(self.eval_ids.cpu().numpy().tobytes()).hexdigest(),
                   "seqlen": self.seqlen, "eval_windows": self.eval_windows, "model": self._digest(),
                   "threads": torch.get_num_threads(), "device": self.device.type,
                   "versions": {k: v for k, v in versions().items() if k != "python"}}
            hit = self._read_cache(store, PERPLEXITY_CACHE, "perplexity")
            ok = hit.get("eval") == key and isinstance(hit.get("perplexity_before"), float)
            return key, hit["perplexity_before"] if ok else None

        key, before = self.comm.decided_by_main(cached, "reading the cached perplexity")
        if before is None:
            t = time.perf_counter()
            before = evaluate_perplexity(self.model, self.eval_ids, progress=self._progress,
                                         offload=self.offload or False,
                                         offload_dir=self.placement.offload_dir, **self._eval_kwargs())
            self.frontend.log(f"perplexity before: {before:.3f} ({time.perf_counter() - t:.1f} s)")
            if self.comm.is_main:
                store.write_extra(PERPLEXITY_CACHE, {"perplexity_before": before, "eval": key})
        return before

    def _tasks_before(self, store) -> dict:
        """The tasks' results on the dense model; on resume the cached ones for the same tasks and model."""
        from ._digest import model_digest

        key = {"tasks": self.task_names, "tasks_path": self.tasks.tasks_path,
               "num_fewshot": self.tasks.num_fewshot, "limit": self.tasks.limit,
               "model": model_digest(self.model)}
        cached = self._read_cache(store, TASKS_CACHE, "task results")
        if cached.get("key") == key and isinstance(cached.get("before"), dict):
            return cached["before"]
        before = run_tasks(self.model, self.tok, self.tasks, self.task_names, self.device, self.frontend.log)
        store.write_extra(TASKS_CACHE, {"key": key, "before": before})
        return before

    @property
    def _progress(self) -> bool:
        return self.frontend.progress and self.comm.is_main

    def _eval_kwargs(self) -> dict:
        return dict(seqlen=self.seqlen, max_windows=self.eval_windows, device=self.device,
                    distributed=self.comm)

    def _streamed_after(self):
        """A streamed model's perplexity after pruning, computed block by block while the pipeline holds
        each block (LayerwisePerplexity.advance runs when a block is final)."""
        from .eval import evaluation_windows
        from .models.activations import ActivationStore, resolve_offload
        from .models.layerwise_eval import LayerwisePerplexity

        windows = evaluation_windows(self.net, self.eval_ids, self.seqlen, None, self.eval_windows)
        after = LayerwisePerplexity(self.net, windows, self.device, self.comm,
                                    ActivationStore(resolve_offload(self.offload), self.device,
                                                    self.placement.offload_dir))
        self.model.on_block_final.append(after.advance)
        return after

    def _prune(self, calib, store) -> dict:
        from .models import prune_model

        try:
            return prune_model(self.model, calib, device=self.device, offload=self.offload or False,
                               offload_dir=self.placement.offload_dir, progress=self._progress,
                               state_dir=store.folder, distributed=self.comm, config=self.config)
        except (ValueError, TypeError) as exc:
            raise self._settings_error(exc) from None

    def _work(self, store, overwrite: bool) -> RunResult:
        from .eval import evaluate_perplexity

        self._t0 = time.perf_counter()
        embedded = self.model_arg is None
        self._load()
        self.nsamples = self.texts.nsamples or (defaults.EMBEDDED_NSAMPLES if embedded
                                                else _default_nsamples())
        # the sparsegpt protocol evaluates every window, as the papers do
        self.eval_windows = self.texts.eval_windows or (
            defaults.EMBEDDED_EVAL_WINDOWS if embedded and self.protocol == "default" else None)
        calib, self.eval_ids, records = self.comm.decided_by_main(self._tokenise, "tokenising")
        self.comm.decided_by_main(lambda: self._check_space(store), "checking free space")
        ppl, tasks = {}, {}
        if self.eval_ids is not None:
            ppl["before"] = self._perplexity_before(store)
        if self.task_names:  # one process, in memory (refused otherwise in _validate)
            tasks["before"] = self._tasks_before(store)
        after = self._streamed_after() if self.eval_ids is not None and self.placement.stream else None
        report = self._prune(calib, store)
        if self.eval_ids is not None:
            t = time.perf_counter()
            ppl["after"] = after.result() if after is not None else evaluate_perplexity(
                self.model, self.eval_ids, progress=self._progress, **self._eval_kwargs())
            self.frontend.log(f"perplexity after: {ppl['after']:.3f} ({time.perf_counter() - t:.1f} s)")
        if self.task_names:
            tasks["after"] = run_tasks(self.model, self.tok, self.tasks, self.task_names, self.device,
                                       self.frontend.log)
        self._complete_report(report, ppl, tasks, records)
        self.comm.decided_by_main(lambda: self._publish(report, store, overwrite), "saving the output")
        return self._result(report)

    def _complete_report(self, report: dict, ppl: dict, tasks: dict, records: dict | None) -> None:
        """The run's own fields added to prune_model's report."""
        from . import protocols

        texts = self.texts
        if ppl:
            n_win = self.eval_ids.numel() // self.seqlen
            ppl.update(seqlen=self.seqlen, windows=min(n_win, self.eval_windows or n_win),
                       text=records["eval"][0] if records else None,
                       text_sha256=records["eval"][1] if records else None, protocol=self.protocol,
                       corpus=self.corpus if self.protocol == "sparsegpt" else None,
                       text_field=self.text_field, computed=protocols.describe(self.protocol, self.corpus))
        report.update({
            "command": self.frontend.command,
            "model_path": str(self.path), "seed": texts.seed, "perplexity": ppl or None,
            "tasks": tasks or None,
            "calibration": {"source": records["calib"][0] if records else None,
                            "source_sha256": records["calib"][1] if records else None,
                            "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": texts.seed,
                            "protocol": self.protocol, "text_field": self.text_field},
            "save_format": self.output.save_format, "seconds_total": time.perf_counter() - self._t0,
        })

    def _publish(self, report: dict, store, overwrite: bool) -> None:
        """Rank 0: the folder published atomically, then the state deleted."""
        from . import output
        from ._io import write_error

        model = None if self.placement.stream else self.model
        try:
            output.save(model, self.tok, self.out, self.output.save_format, report, overwrite,
                        self._n("out"), built=self._built)
        except output.OutputChanged:
            raise RunError(f"{self._n('out')} {str(self.out.resolve())!r} became non-empty during the run; "
                           f"pass {self._n('overwrite')}") from None
        except OSError as exc:  # the state holds every pruned block: a rerun only saves again
            raise RunError(f"{write_error(exc, self._n('out'), self.out)}; then rerun with "
                           f"{self._n('resume')} to save the pruned model without pruning again") from None
        store.remove()

    def _result(self, report: dict) -> RunResult:
        from .output import dtype_note

        note = None
        if self.comm.is_main:
            model_path = None if self.model_arg is None else Path(self.path)
            note = dtype_note(model_path, self.model, self.out, self.output.save_format)
        return RunResult(report, self.out, Path(self.path), self.comm.is_main, note)


def _default_nsamples() -> int:
    from .data import DEFAULT_NSAMPLES

    return DEFAULT_NSAMPLES


def run_prune(model: str | os.PathLike | None, output: str | os.PathLike | OutputSettings, *,
              texts: TextSettings = TextSettings(), placement: Placement = Placement(),
              tasks: TaskSettings | None = None, log: Callable[[str], None] | None = None,
              progress: bool = False, config: PruneConfig | None = None, **prune) -> RunResult:
    """Prune `model` (a transformers folder; None: the embedded SmolLM2-135M) and publish the result in
    `output` (a folder, or OutputSettings for overwrite / resume / save_format); `prune`: prune_model's
    keyword arguments (sparsity=0.5, pattern="unstructured", method="admm", layers, sparsity_profile, ...,
    method options), or `config`, an admm_kernels.PruneConfig (keywords given too replace its fields).
    log: a callable taking each progress line (default: logging, logger "admm_kernels.run"). Returns a
    RunResult (the report and the output folder). Raises RunError (a
    ValueError naming the argument) for a refused input, admm_kernels._io.WriteError for a failed write.
    An interrupted run is continued by the same call with OutputSettings(..., resume=True)."""
    if not isinstance(output, OutputSettings):
        output = OutputSettings(output)
    frontend = Frontend(progress=progress) if log is None else Frontend(log=log, progress=progress)
    settings = prune if config is None else {**config.keywords(), **prune}
    return PruneRun(model, output, settings, texts, placement, tasks, frontend).run()
