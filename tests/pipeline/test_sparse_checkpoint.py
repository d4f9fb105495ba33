"""Compressed checkpoints: bit-identical round trips, rebuild from config, corrupt/truncated files, size."""

from __future__ import annotations

import json
import os

import pytest
import torch
from sparse_helpers import nm_weight, prune_linears_nm, tiny_llama, unstructured_weight
from torch import nn

from admm_kernels.sparse import SparseLinear, load_sparse, read_checkpoint, save_sparse, sparsify


def _stack(dtype=torch.float32) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(64, 48, dtype=dtype), nn.GELU(),
                          nn.Linear(48, 40, bias=False, dtype=dtype),
                          nn.Linear(40, 24, dtype=dtype), nn.LayerNorm(24, dtype=dtype))
    with torch.no_grad():
        model[0].weight.copy_(nm_weight(48, 64, 2, 4, dtype))
        model[2].weight.copy_(nm_weight(40, 48, 4, 8, dtype, seed=1))
        model[3].weight.copy_(unstructured_weight(24, 40, 0.9, dtype, seed=2))
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_identical_into_skeleton(tmp_path, dtype):
    sparse = sparsify(_stack(dtype))
    path = save_sparse(sparse, tmp_path / "m.safetensors")
    loaded = load_sparse(path, model=_stack(dtype))
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in sparse]
    assert [m.pattern for m in loaded if isinstance(m, SparseLinear)] == ["2:4", "4:8", "unstructured"]
    _assert_identical(sparse, loaded)
    x = torch.randn(3, 64).to(dtype)
    assert torch.equal(loaded(x), sparse.eval()(x))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left behind


def test_save_packs_dense_pruned_model_without_modifying_it(tmp_path):
    model = _stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_sparse(model, tmp_path / "m.safetensors")
    assert all(type(m) is not SparseLinear for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, doc = read_checkpoint(tmp_path / "m.safetensors")
    patterns = {k: v["pattern"] for k, v in doc["layers"].items()}
    assert patterns == {"0": "2:4", "2": "4:8", "3": "unstructured"}


def test_tiny_llama_rebuilt_from_config_generates_identically(tmp_path):
    model = tiny_llama(tie=True)
    prune_linears_nm(model, 2, 4)
    path = save_sparse(model, tmp_path / "llama.safetensors")
    loaded = load_sparse(path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, SparseLinear)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expect = model.generate(ids, max_new_tokens=10, do_sample=False)
        got = loaded.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(expect, got)
    _assert_identical(sparsify(model), loaded)


def test_2_4_fp16_checkpoint_at_most_56_percent_of_dense(tmp_path):
    from safetensors.torch import save_file, save_model

    # Proportions of a large LLM (LLaMA-7B: embeddings ~4 % of the weights): hidden 256 >> vocab 96 here.
    # (With dense embeddings the ratio is 0.531 * linear share + embedding share: SmolLM2-135M, 21 %
    # embeddings, lands at ~63 %.)
    model = tiny_llama(tie=True, hidden=256, intermediate=704).half()
    prune_linears_nm(model, 2, 4)
    save_model(model, str(tmp_path / "dense.safetensors"))  # tied weights stored once, as we do
    save_sparse(model, tmp_path / "sparse.safetensors")
    ratio = os.path.getsize(tmp_path / "sparse.safetensors") / os.path.getsize(tmp_path / "dense.safetensors")
    assert ratio <= 0.56, ratio
    # Pure 2:4 layers: 1/2 values + 2.67 bits a group of 4 fp16 (64 bits) = 54.2 % (plus headers).
    stack = nn.Sequential(*[nn.Linear(256, 256, bias=False, dtype=torch.float16) for _ in range(4)])
    prune_linears_nm(stack, 2, 4, skip=())
    save_file({k: v.contiguous() for k, v in stack.state_dict().items()}, str(tmp_path / "d2.safetensors"))
    save_sparse(stack, tmp_path / "s2.safetensors")
    ratio2 = os.path.getsize(tmp_path / "s2.safetensors") / os.path.getsize(tmp_path / "d2.safetensors")
    assert 0.53 <= ratio2 <= 0.56, ratio2


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_corrupt_data_is_detected(tmp_path):
    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    pos = _data_offset(path) + (len(raw) - _data_offset(path)) // 2
    raw[pos] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt: checksum mismatch"):
        load_sparse(bad, model=_stack())


@pytest.mark.parametrize("keep", [0.3, 0.99, 5])
def test_truncated_file_is_rejected(tmp_path, keep):
    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    raw = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(raw) * keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(raw[:n])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sparse(bad, model=_stack())


def test_tampered_description_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not an admm_kernels sparse checkpoint"):
        load_sparse(plain)
    with pytest.raises(ValueError, match="is not a file"):
        load_sparse(tmp_path / "missing.safetensors")
    # A consistent file whose description lies about a layer: caught by the format checks.
    model = sparsify(_stack())
    path = save_sparse(model, tmp_path / "m.safetensors")
    tensors, doc = read_checkpoint(path)
    doc["layers"]["0"]["in_features"] = 32
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata={"admm_kernels.sparse": json.dumps(doc)})
    with pytest.raises(ValueError):
        load_sparse(tmp_path / "lie.safetensors", model=_stack())
    with pytest.raises(ValueError, match="without a transformers config"):
        load_sparse(path)


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_sparse(sparsify(_stack()), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_save_bad_input(tmp_path):
    with pytest.raises(TypeError, match="model must be"):
        save_sparse("x", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="directory"):
        save_sparse(_stack(), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        save_sparse(_stack(), tmp_path / "no" / "m.safetensors")


def test_24_pair_code_round_trip_and_rejects_bad_bytes():
    from admm_kernels.backends import reference as ref
    from admm_kernels.sparse.checkpoint import decode_24_meta, encode_24_meta

    w = nm_weight(5, 4 * 7, 2, 4)  # 7 groups: the last byte holds one padded group
    w[0, :4] = 0.0
    _, meta = ref.pack_nm(w, 2, 4)
    code = encode_24_meta(meta, 28)
    assert code.shape == (5, 3) and int(code.max()) < 216
    assert torch.equal(decode_24_meta(code, 5, 28), meta)
    bad = code.clone()
    bad[1, 1] = 250
    with pytest.raises(ValueError, match=">= 216"):
        decode_24_meta(bad, 5, 28)
    unsorted = ref._bits_pack(torch.tensor([[3, 1] * 7]), 2)  # positions not ascending: kept as bits
    assert encode_24_meta(unsorted, 28) is None


def test_checksum_covers_the_description(tmp_path):
    from safetensors.torch import save_file

    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    tensors, doc = read_checkpoint(path)
    doc["model"] = {"class": "LlamaForCausalLM", "config": {"rope_theta": 1.0}}  # tensors untouched
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={"admm_kernels.sparse": json.dumps(doc)})
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_sparse(edited, model=_stack())


@pytest.mark.parametrize("change", ["shape", "missing", "kind"])
def test_loading_into_a_model_of_another_structure_fails(tmp_path, change):
    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    target = _stack()
    if change == "shape":
        target[3] = nn.Linear(40, 12)
        match = "stored as 24x40"
    elif change == "missing":
        target = nn.Sequential(*list(target)[:3])
        match = "has no module '3'"
    else:
        target[3] = nn.Conv1d(40, 24, 1)
        match = "not a linear layer"
    with pytest.raises(ValueError, match=match):
        load_sparse(path, model=target)


def test_load_state_dict_validates_index_data():
    layer = sparsify(_stack())[3]  # 90 % sparse: CSR
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["col"][0] = 30000  # out of range for 40 inputs
    with pytest.raises(ValueError):
        layer.load_state_dict(state, assign=True)


def test_saved_file_gets_the_umask_mode_not_0600(tmp_path):
    path = save_sparse(sparsify(_stack()), tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_into_an_unwritable_place_names_the_destination(tmp_path):
    model = sparsify(_stack())
    # /proc refuses new files even for root (chmod read-only does not stop root)
    with pytest.raises(OSError, match=r"cannot write the sparse checkpoint '/proc/m\.safetensors'") as exc:
        save_sparse(model, "/proc/m.safetensors")
    assert ".tmp" not in str(exc.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=rf"'{blocker}' is not a directory"):
        save_sparse(model, blocker / "m.safetensors")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PermissionError, match=rf"cannot write the sparse checkpoint '{ro}/m"):
                save_sparse(model, ro / "m.safetensors")
        finally:
            ro.chmod(0o755)
    assert sorted(os.listdir(tmp_path)) == ["file"] + (["ro"] if os.geteuid() != 0 else [])


def test_load_sparse_accepts_a_packed_model_folder(tmp_path):
    from admm_kernels.sparse.checkpoint import PACKED_FILE

    sparse = sparsify(_stack())
    save_sparse(sparse, tmp_path / PACKED_FILE)
    _assert_identical(sparse, load_sparse(tmp_path, model=_stack()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"'{tmp_path / 'empty'}' is not a packed model folder: it has no "
                                         rf"{PACKED_FILE}"):
        load_sparse(tmp_path / "empty", model=_stack())
