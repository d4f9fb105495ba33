"""Models larger than memory: a StreamedModel reads each block from the checkpoint just before
its turn and writes it out when pruned. Its output, report, digest and perplexity equal the in-memory
path's bit for bit; the live tensor bytes do not grow with the number of blocks; activations can live in
a file."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import Interrupt, stop_after, tiny_model, tiny_tokens  # noqa: E402
from tiny_models import live_cpu_tensor_bytes as _live_cpu_tensor_bytes  # noqa: E402

import admm_kernels as ak  # noqa: E402
from admm_kernels._digest import model_digest  # noqa: E402
from admm_kernels.models import activations  # noqa: E402
from admm_kernels.models.loading import load_model  # noqa: E402
from admm_kernels.models.streaming import SafetensorsReader, StreamedModel, write_safetensors  # noqa: E402

FAST = dict(iters=4, T=3)
pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(tmp_path, arch="llama", name="dense", model=None):
    path = tmp_path / name
    (model or tiny_model(arch)).save_pretrained(path)
    return path


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _layer_results(report):
    return [(r["name"], r["error"], r["kept"]) for r in report["layers"]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_streamed_pruning_equals_in_memory(tmp_path, arch):
    """GPT-2 and OPT tie their head to the embedding (written once, re-tied on load); GPT-2's layers are
    Conv1D."""
    dense = _folder(tmp_path, arch)
    memory, _, _ = load_model(dense, with_tokenizer=False)
    ids = tiny_tokens(4, 16)
    expected = ak.prune_model(memory, ids, sparsity=0.6, **FAST)
    out = tmp_path / "out"
    out.mkdir()
    report = ak.prune_model(StreamedModel(dense, output=out), ids, sparsity=0.6, **FAST)
    assert _layer_results(report) == _layer_results(expected) and report["streamed"] is True
    written, _, _ = load_model(out, with_tokenizer=False)
    assert _same(_state(written), _state(memory))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert sorted(set(index["weight_map"].values())) == shards
    from safetensors import safe_open  # our writer's files are ordinary safetensors files

    block0 = {k for k in index["weight_map"] if k.startswith(f"{report['blocks_name']}.0.")}
    with safe_open(out / shards[1], "pt") as fh:  # shard 2 holds block 0 exactly
        assert set(fh.keys()) == block0


def test_digest_and_perplexity_of_a_streamed_model_equal_the_in_memory_ones(tmp_path):
    dense = _folder(tmp_path, "qwen2")  # sliding-window layers: per-block attention masks
    memory, _, _ = load_model(dense, with_tokenizer=False)
    streamed = StreamedModel(dense)
    assert streamed.digest() == model_digest(memory)
    assert all(p.device.type == "meta" for b in streamed.blocks for p in b.parameters())  # never loaded
    text = tiny_tokens(1, 80, seed=4)[0]
    ppl = ak.evaluate_perplexity(memory, text, seqlen=16)
    assert ak.evaluate_perplexity(streamed, text, seqlen=16) == ppl
    assert ak.evaluate_perplexity(streamed, text, seqlen=16, offload="disk", offload_dir=tmp_path) == ppl
    assert not any(p.name.startswith("admm-acts-") for p in tmp_path.iterdir())
    bf16 = StreamedModel(dense, dtype=torch.bfloat16)
    memory16, _, _ = load_model(dense, dtype=torch.bfloat16, with_tokenizer=False)
    assert bf16.digest() == model_digest(memory16) != streamed.digest()


def test_resume_across_in_memory_and_streamed_runs(tmp_path):
    """The state does not depend on streaming: a run interrupted in memory continues streamed."""
    dense = _folder(tmp_path)
    ids = tiny_tokens(3, 16)
    reference, _, _ = load_model(dense, with_tokenizer=False)
    ak.prune_model(reference, ids, sparsity=0.6, **FAST)
    first, _, _ = load_model(dense, with_tokenizer=False)
    with pytest.raises(Interrupt):
        ak.prune_model(first, ids, sparsity=0.6, state_dir=tmp_path / "state", callback=stop_after(0), **FAST)
    out = tmp_path / "out"
    out.mkdir()
    report = ak.prune_model(StreamedModel(dense, output=out), ids, sparsity=0.6, state_dir=tmp_path / "state",
                            **FAST)
    assert report["resumed_from_block"] == 1
    written, _, _ = load_model(out, with_tokenizer=False)
    assert _same(_state(written), _state(reference))


def _peak_live_bytes(tmp_path, layers: int, streamed: bool, monkeypatch) -> tuple[int, int]:
    """(peak live CPU tensor bytes while pruning, bytes of one block) for a LLaMA of `layers` blocks."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = _folder(tmp_path, name=f"llama{layers}", model=tf.LlamaForCausalLM(config))
    block = tf.LlamaForCausalLM(config).model.layers[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    peak = [0]

    def sample(*_):
        gc.collect()
        peak[0] = max(peak[0], _live_cpu_tensor_bytes())

    out = tmp_path / f"out{layers}{streamed}"
    out.mkdir()
    if streamed:
        model = StreamedModel(path, output=out)
        real_load = model.load_block

        def load_and_sample(b):  # the moment a new block arrives
            real_load(b)
            sample()
        monkeypatch.setattr(model, "load_block", load_and_sample)
    else:
        model, _, _ = load_model(path, with_tokenizer=False)
    ak.prune_model(model, tiny_tokens(2, 16), sparsity=0.5, method="magnitude", callback=sample)
    del model
    gc.collect()
    return peak[0], block_bytes


def test_live_tensor_bytes_do_not_grow_with_the_number_of_blocks(tmp_path, monkeypatch):
    """Streamed: 8 blocks instead of 4 add less than 3 blocks' bytes to the peak (the activations and the
    non-block weights are the same); in memory the peak grows by all 4 blocks (the measurement sees it)."""
    p4, block = _peak_live_bytes(tmp_path, 4, True, monkeypatch)
    p8, _ = _peak_live_bytes(tmp_path, 8, True, monkeypatch)
    print(f"live tensor bytes, streamed: {p4} -> {p8}; in memory: ", end="")
    assert p8 - p4 < 3 * block, (p4, p8, block)
    m4, _ = _peak_live_bytes(tmp_path, 4, False, monkeypatch)
    m8, _ = _peak_live_bytes(tmp_path, 8, False, monkeypatch)
    print(f"{m4} -> {m8}; one block {block}")
    assert m8 - m4 >= 3.9 * block, (m4, m8, block)
    assert p8 < m8


def test_activations_in_a_file(tmp_path, monkeypatch):
    """offload="disk": the same result; the file is made in offload_dir and unlinked at once."""
    made = []
    real = activations.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name
    monkeypatch.setattr(activations.tempfile, "mkstemp", spy)
    ids = tiny_tokens(3, 16)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = ak.prune_model(a, ids, sparsity=0.6, **FAST)
    rb = ak.prune_model(b, ids, sparsity=0.6, offload="disk", offload_dir=tmp_path, **FAST)
    assert _same(_state(a), _state(b)) and _layer_results(ra) == _layer_results(rb)
    assert made and all(os.path.dirname(n) == str(tmp_path) and not os.path.exists(n) for n in made)
    assert rb["offload"] == "disk"


def test_bad_streaming_input(tmp_path):
    dense = _folder(tmp_path)
    with pytest.raises(ValueError, match="must be an existing empty folder"):
        StreamedModel(dense, output=dense)
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_bytes((dense / "config.json").read_bytes())
    torch.save(tiny_model("llama").state_dict(), bin_only / "pytorch_model.bin")
    with pytest.raises(ValueError, match="has no safetensors weights"):
        StreamedModel(bin_only)
    extra = tmp_path / "extra"
    extra.mkdir()
    for f in dense.iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    tensors = {k: SafetensorsReader(dense / "model.safetensors").read(k)
               for k in SafetensorsReader(dense / "model.safetensors").keys()}
    stray = {"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}
    write_safetensors(extra / "model.safetensors", {**tensors, **stray})
    with pytest.raises(ValueError, match=r"1 tensors with no place.*model.layers.9.mlp.up_proj.weight"):
        StreamedModel(extra)
    del tensors["model.layers.2.mlp.down_proj.weight"]
    write_safetensors(extra / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="no tensor model.layers.2.mlp.down_proj.weight"):
        StreamedModel(extra)
    with pytest.raises(ValueError, match="sparsity_profile='owl' needs a dense pass over every block"):
        ak.prune_model(StreamedModel(dense), tiny_tokens(2, 16), sparsity_profile="owl")
    with pytest.raises(ValueError, match="offload must be False, True, 'cpu' or 'disk'"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), offload="gpu")
    with pytest.raises(ValueError, match="offload_dir is only used with offload='disk'"):
        ak.prune_model(tiny_model("llama"), tiny_tokens(2, 16), offload="cpu", offload_dir=tmp_path)


def test_safetensors_writer_and_reader_round_trip(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.tensor([True, False]), "e": torch.zeros(0, 3, dtype=torch.float16),
               "f": torch.randn(4, 6).t()}  # not contiguous
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors)
    reader = SafetensorsReader(path)
    with safe_open(path, "pt") as fh:
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v) and torch.equal(reader.read(k), v), k
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="empty, truncated or not a safetensors file"):
        SafetensorsReader(path)


def test_cli_stream_equals_in_memory(tiny_model_root, tmp_path, capsys):
    from admm_kernels.cli import main

    root = tiny_model_root
    common = ["prune", str(root / "tiny-llama"), "--calib", str(root / "calib.txt"), "--eval-text",
              str(root / "eval.txt"), "--nsamples", "3", "--seqlen", "16", "--quiet", "-o", "iters=4",
              "-o", "T=3", "--sequential"]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    streamed = [*common, "--out", str(tmp_path / "streamed"), "--stream", "--offload-dir", str(tmp_path)]
    assert main(streamed) == 0
    a = json.loads((tmp_path / "memory" / "prune_report.json").read_text())
    b = json.loads((tmp_path / "streamed" / "prune_report.json").read_text())
    assert a["perplexity"] == b["perplexity"] and _layer_results(a) == _layer_results(b)
    assert b["streamed"] and b["sequential"] and not a["streamed"]
    wa, _, _ = load_model(tmp_path / "memory", with_tokenizer=False)
    wb, tok, _ = load_model(tmp_path / "streamed")
    assert _same(_state(wa), _state(wb)) and tok is not None
    assert main(["eval", str(tmp_path / "streamed"), "--eval-text", str(root / "eval.txt"), "--stream",
                 "--quiet"]) == 0
    assert main([*common, "--out", str(tmp_path / "x"), "--stream", "--save-format", "packed"]) == 2
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x"), "--stream", "--sparsity-profile", "owl"]) == 2
    assert "--sparsity-profile owl needs a dense pass" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x"), "--stream", "--tasks", "x"]) == 2
    assert "not with --stream or under torchrun" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--offload-dir", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not any(p.name.startswith("admm-acts-") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def six_block_folder(tmp_path_factory):
    """A 6-block LLaMA (blocks of ~210 KB, large against the activations of 4 x 16 tokens) with the tiny
    tokenizer and texts; returns (root, bytes of one block)."""
    import transformers as tf
    from tiny_models import tiny_text, tiny_tokenizer

    root = tmp_path_factory.mktemp("six-blocks")
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text(tiny_text(400, seed=1))
    (root / "eval.txt").write_text(tiny_text(200, seed=2))
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return root, block


@pytest.mark.parametrize("mode", [["--no-eval"], [], ["--no-eval", "--offload"], ["--offload-dir", "DIR"],
                                  ["--no-eval", "--sequential"], ["--no-eval", "--tune-epochs", "1"]],
                         ids=["no-eval", "eval", "offload", "offload-dir", "sequential", "block-tuning"])
def test_cli_stream_holds_one_block_whatever_the_mode(six_block_folder, tmp_path, monkeypatch, mode):
    """The live tensor bytes when each block arrives are those of block 0's arrival (one block, the
    activations, the non-block weights): no earlier block is still held, with or without evaluation,
    offloaded activations, sequential pruning or block tuning. (prune_model kept the last saved block's
    pruned weights alive through the next block: one block more at every step after the first.) The
    packed format cannot be streamed (refused); torchrun is not run here."""
    from admm_kernels.cli import main

    root, block = six_block_folder
    samples = []
    real_load = StreamedModel.load_block

    def load_and_sample(self, b):
        real_load(self, b)
        gc.collect()
        samples.append(_live_cpu_tensor_bytes())
    monkeypatch.setattr(StreamedModel, "load_block", load_and_sample)
    mode = [str(tmp_path) if m == "DIR" else m for m in mode]
    argv = ["prune", str(root / "model"), "--stream", "--calib", str(root / "calib.txt"), "--eval-text",
            str(root / "eval.txt"), "--nsamples", "4", "--seqlen", "16", "--eval-windows", "2", "--method",
            "magnitude", "--quiet", "--out", str(tmp_path / "out"), *mode]
    assert main(argv) == 0
    pruning = samples[-6:]  # with evaluation, the dense pass before pruning loads every block first
    assert len(samples) == (6 if "--no-eval" in mode else 12)
    assert max(pruning) - pruning[0] < 0.5 * block, (pruning, block)


def test_released_blocks_hand_their_memory_back(tmp_path, monkeypatch):
    """Each released block trims the C heap (see streaming.return_freed_memory)."""
    from admm_kernels.models import streaming

    if streaming._MALLOC_TRIM is None:
        pytest.skip("not glibc: nothing to trim")
    calls = []
    monkeypatch.setattr(streaming, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    path = _folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    ak.prune_model(StreamedModel(path, output=out), tiny_tokens(2, 16), sparsity=0.5, method="magnitude")
    assert calls == [0, 0, 0]  # 3 blocks, each trimmed once when released
