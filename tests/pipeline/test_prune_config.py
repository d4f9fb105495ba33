"""The settings object of a prune run (PruneConfig), the errors naming their argument
(admm_kernels.errors), and the typed resume point of the state folder (ResumePoint)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels.errors import ArgumentError, ArgumentTypeError, InvalidArgument, about  # noqa: E402
from admm_kernels.models import state as state_mod  # noqa: E402
from admm_kernels.models.config import PruneConfig  # noqa: E402

FAST = dict(iters=4, T=3)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_is_exported_and_collects_the_method_options():
    assert ak.PruneConfig is PruneConfig is ak.models.PruneConfig
    cfg = PruneConfig(sparsity=0.6, method="admm", layers=["mlp.*"], **FAST)
    assert cfg.options == {"iters": 4, "T": 3} and cfg.sparsity == 0.6 and cfg.pattern == "unstructured"
    with pytest.raises(TypeError):
        cfg.options["iters"] = 5  # read-only
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.7  # frozen
    assert PruneConfig(**cfg.keywords()) == cfg
    assert PruneConfig(options={"iters": 4}, T=3) == PruneConfig(iters=4, T=3)
    for copied in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert copied == cfg and copied.options == {"iters": 4, "T": 3}
    tuned = PruneConfig(tune_epochs="auto", tune_patience=3, tune_holdout=4)
    assert PruneConfig(**tuned.keywords()) == tuned and tuned.options == {}
    assert (tuned.tune_epochs, tuned.tune_patience, tuned.tune_holdout) == ("auto", 3, 4)


@pytest.mark.parametrize("kwargs,error,argument,match", [
    (dict(sparsity=1.5), ArgumentError, "sparsity", "sparsity must be in"),
    (dict(sparsity=[0.5, 0.5]), ArgumentError, "sparsity", "has 2 per-block values"),
    (dict(sparsity=[0.5, 1.2, 0.5]), ArgumentError, "sparsity", r"sparsity\[1\]"),
    (dict(sparsity="half"), ArgumentTypeError, "sparsity", "sequence of 3 floats"),
    (dict(sparsity_profile="owl2"), ArgumentError, "sparsity_profile", "unknown sparsity_profile"),
    (dict(sparsity_profile=3), ArgumentTypeError, "sparsity_profile", "must be a str"),
    (dict(sparsity_profile="owl", pattern="2:4"), ArgumentError, "sparsity_profile", "N:M"),
    (dict(owl_m=5.0), ArgumentError, "owl_m", "is an option of sparsity_profile='owl'"),
    (dict(sparsity_profile="owl", owl_m=-1.0), ArgumentError, "owl_m", "owl_m"),
    (dict(sparsity_profile="owl", owl_lambda=0.6), ArgumentError, "owl_lambda", "too large"),
    (dict(tune_epochs=-1), ArgumentError, "tune_epochs", "tune_epochs must be >= 0"),
    (dict(tune_epochs=1.5), ArgumentTypeError, "tune_epochs", "must be an int"),
    (dict(tune_batch=0), ArgumentError, "tune_batch", "tune_batch must be >= 1"),
    (dict(tune_lr=0.0), ArgumentError, "tune_lr", "tune_lr must be a finite number"),
    (dict(tune_epochs="long"), ArgumentError, "tune_epochs", "must be an int or 'auto'"),
    (dict(tune_epochs=2, tune_patience=-1), ArgumentError, "tune_patience", "tune_patience must be >= 0"),
    (dict(tune_epochs=2, tune_holdout=1), ArgumentError, "tune_holdout", "tune_holdout must be >= 2"),
    (dict(moe_calibration="dense"), ArgumentError, "moe_calibration", "moe_calibration must be one of"),
    (dict(layers=["attn.nope"]), ArgumentError, "layers", "matches no linear layer"),
    (dict(layers="mlp.*"), ArgumentTypeError, "layers", "list of glob patterns"),
    (dict(gram_dtype=torch.float16), ArgumentTypeError, "gram_dtype", "gram_dtype"),
    (dict(sequential="yes"), ArgumentTypeError, "sequential", "sequential must be a bool"),
    (dict(pattern="3:5"), ArgumentError, "pattern", r"pattern '3:5' is invalid for layer"),
])
def test_validation_errors_name_their_argument(kwargs, error, argument, match):
    """Each bad setting raises the error type it always did (ValueError / TypeError), its message
    unchanged, and says which argument it is about, for callers with other names for them (CLI flags)."""
    model = tiny_model("llama")
    with pytest.raises(error, match=match) as exc:
        PruneConfig(**kwargs).validate(model)
    assert exc.value.argument == argument
    with pytest.raises(error, match=match) as exc:  # prune_model raises the same, naming the same
        ak.prune_model(model, tiny_tokens(1, 8), **kwargs)
    assert exc.value.argument == argument


def test_run_arguments_name_themselves_too():
    model = tiny_model("llama")
    with pytest.raises(ArgumentError, match="integer token ids|shape") as exc:
        ak.prune_model(model, torch.zeros(8, dtype=torch.long))
    assert exc.value.argument == "calibration"
    with pytest.raises(ArgumentTypeError, match="callback must be callable") as exc:
        ak.prune_model(model, tiny_tokens(1, 8), callback=3)
    assert exc.value.argument == "callback"
    with pytest.raises(ArgumentTypeError, match="config must be a PruneConfig") as exc:
        ak.prune_model(model, tiny_tokens(1, 8), 0.5)
    assert exc.value.argument == "config"


def test_about_keeps_the_type_and_message_and_pickles():
    with pytest.raises(ArgumentTypeError) as exc:
        with about("x"):
            raise TypeError("x must be an int")
    assert isinstance(exc.value, TypeError) and str(exc.value) == "x must be an int"
    with pytest.raises(ArgumentError, match="^x is 3$") as exc:
        with about("x"):
            with about("inner"):
                raise ArgumentError("x is 3", "x")
    assert exc.value.argument == "x"  # an error that names its argument already keeps it
    again = pickle.loads(pickle.dumps(exc.value))
    assert isinstance(again, (InvalidArgument, ValueError)) and again.argument == "x"


def test_prune_model_with_a_config_is_bit_identical_to_keywords():
    ids = tiny_tokens(3, 16)
    settings = dict(sparsity=[0.5, 0.6, 0.7], method="admm", sequential=True, layers=["self_attn.*", "mlp.*"],
                    **FAST)
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    by_keywords = ak.prune_model(a, ids, **settings)
    by_config = ak.prune_model(b, ids, PruneConfig(**settings))
    # keywords given with a config replace its fields
    overridden = ak.prune_model(c, ids, config=PruneConfig(**{**settings, "sparsity": 0.9}),
                                sparsity=settings["sparsity"])
    for other in (b, c):
        for (n, p), (_, q) in zip(a.named_parameters(), other.named_parameters()):
            assert torch.equal(p, q), n
    for report in (by_config, overridden):
        for key in ("layers", "sparsity", "sparsity_profile", "options", "coverage", "achieved_sparsity"):
            got = [{k: v for k, v in r.items() if k != "seconds"} for r in report[key]] \
                if key == "layers" else report[key]
            want = [{k: v for k, v in r.items() if k != "seconds"} for r in by_keywords[key]] \
                if key == "layers" else by_keywords[key]
            assert got == want, key


def test_the_resume_point_is_typed_and_round_trips(tmp_path):
    """PipelineState.load returns the ResumePoint that the last save returned, field for field; it
    pickles (rank 0 sends it to the other ranks) and rebuilds from its JSON record."""
    ids = tiny_tokens(3, 16)
    folder = tmp_path / "state"
    points = []
    real_save = state_mod.PipelineState.save

    def keep(self, *a, **kw):
        points.append(real_save(self, *a, **kw))
        return points[-1]

    state_mod.PipelineState.save = keep
    try:
        with pytest.raises(Interrupt):
            ak.prune_model(tiny_model("llama"), ids, sparsity=0.6, state_dir=folder, callback=stop_after(1),
                           **FAST)
    finally:
        state_mod.PipelineState.save = real_save
    saved = points[-1]
    assert isinstance(saved, state_mod.ResumePoint) and saved.next_block == 2
    assert saved.block_files == ("block_0000.safetensors", "block_0001.safetensors")
    assert saved.acts_file == "acts_0002.safetensors" and saved.activations[0] == (3, 16, 32)
    assert saved.activations[1] == "torch.float32" and saved.block_tune == []
    assert [r["block"] for r in saved.layers] == [0] * 7 + [1] * 7
    store = state_mod.PipelineState(folder)
    with store.lock():
        loaded = store.load(saved.fingerprint, _layout(tiny_model("llama"), ids))
        assert loaded == saved
        assert set(store.block_weights(loaded, 1)) == {r["name"].split(".", 3)[3] for r in saved.layers[7:]}
        assert store.activations(loaded).shape == (3, 16, 32)
    assert state_mod.ResumePoint.from_record(saved.record()) == saved
    assert pickle.loads(pickle.dumps(saved)) == saved
    with pytest.raises(AttributeError):
        saved.next_block = 0  # frozen


def _layout(model, ids):
    from admm_kernels.models.discovery import find_blocks, select_all
    from admm_kernels.models.pipeline import _layout

    name, blocks = find_blocks(model)
    return _layout(select_all(blocks, name), len(blocks), ids)


def test_a_mismatch_carries_the_settings_and_can_be_worded_by_its_caller(tmp_path):
    """The library's message speaks of torch.set_num_threads and process groups; a caller with its own
    means (the CLI's flags) words the same facts its way, as it always printed them."""
    err = state_mod.StateMismatchError(tmp_path, {"threads": (1, 2), "world_size": (2, None)})
    assert err.start_over and isinstance(err, ValueError)
    assert str(err) == (
        f"state_dir {str(tmp_path)!r} belongs to a run with other settings (threads: saved 1, now 2; "
        "world_size: saved 2, now None); results depend on the torch thread count: resume with 1 threads "
        "(torch.set_num_threads); a distributed run's Gram sums depend on the number of ranks: resume with "
        "2 rank(s) (a torch.distributed process group of 2 ranks); use another state folder or delete the "
        "folder to start again")
    cli = state_mod.MismatchWording(threads="admm-prune --threads, torch.set_num_threads",
                                    ranks="torchrun --nproc-per-node {ranks}",
                                    one_rank="one process, without torchrun",
                                    recover=f"{state_mod.RECOVER} (admm-prune: pass --overwrite instead of "
                                            "--resume)")
    assert err.message(cli) == (
        f"state_dir {str(tmp_path)!r} belongs to a run with other settings (threads: saved 1, now 2; "
        "world_size: saved 2, now None); results depend on the torch thread count: resume with 1 threads "
        "(admm-prune --threads, torch.set_num_threads); a distributed run's Gram sums depend on the number "
        "of ranks: resume with 2 rank(s) (torchrun --nproc-per-node 2); use another state folder or delete "
        "the folder to start again (admm-prune: pass --overwrite instead of --resume)")
    one = state_mod.StateMismatchError(tmp_path, {"world_size": (None, 2)})
    assert "resume with 1 rank(s) (one process, without torchrun)" in one.message(cli)
    again = pickle.loads(pickle.dumps(err))
    assert again.mismatch == err.mismatch and str(again) == str(err)


def test_prune_block_returns_what_it_produced():
    """prune_block's results come back as a BlockResult (report entries, tuning report, seconds); only
    the activations are overwritten in place, with the pruned block's outputs."""
    from admm_kernels.models import find_blocks, get_weight, prunable_layers
    from admm_kernels.models.block import BlockContext, BlockResult, prune_block
    from admm_kernels.models.capture import capture_inputs

    cpu = torch.device("cpu")
    model = tiny_model("llama").eval()
    name, blocks = find_blocks(model)
    with torch.no_grad():
        acts, calls = capture_inputs(model, blocks, tiny_tokens(2, 16), cpu, cpu)
        inputs = acts.clone()
        layers = prunable_layers(blocks[0], f"{name}.0")
        result = prune_block(blocks[0], 0, layers, calls[0], acts,
                             dict(sparsity=0.5, pattern="unstructured", method="magnitude"),
                             BlockContext(name, cpu), last=False)
        assert isinstance(result, BlockResult) and result.tune is None
        assert [r["name"] for r in result.layers] == [f"{name}.0.{rel}" for rel in layers]
        assert all(r["kept"] == get_weight(layers[r["name"].split(".", 3)[3]]).count_nonzero()
                   for r in result.layers)
        assert set(result.seconds) == {"forward", "gram", "solve", "tune"} and result.seconds["tune"] == 0
        for j in range(2):
            assert torch.equal(acts[j], calls[0](blocks[0], inputs[j:j + 1])[0])


def test_a_failed_peer_is_a_distributed_error_in_the_library_s_terms():
    """The library names its own argument (timeout_s) and says a peer failed; the advice to resume and
    the flag are the command line's (admm_kernels.cli)."""
    import pickle

    from admm_kernels.cli.common import flag_words
    from admm_kernels.models.distributed import Comm, DistributedError

    comm = Comm.__new__(Comm)
    comm.rank, comm.size, comm.timeout_s = 0, 2, 5.0
    exc = comm._fail("block 2", RuntimeError("Connection closed by peer"))
    assert isinstance(exc, DistributedError) and exc.peer_failed
    assert "(timeout_s)" in str(exc) and "--" not in str(exc) and "resume" not in str(exc)
    assert "(--dist-timeout)" in flag_words(str(exc))
    again = pickle.loads(pickle.dumps(exc))
    assert again.peer_failed and str(again) == str(exc)


def test_a_gpu_index_under_several_ranks_names_the_device_argument(monkeypatch):
    import torch

    from admm_kernels.errors import ArgumentError
    from admm_kernels.models.distributed import rank_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ArgumentError, match="device 'cuda:1' names one GPU") as err:
        rank_device(torch.device("cuda", 1))
    assert err.value.argument == "device" and "--" not in str(err.value)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
