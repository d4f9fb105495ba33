"""Matrices a block multiplies by itself (admm_kernels.models.plain_params): found by tracing the model's
forward, pruned as (out, in) views with exact sparsity and their own input rows, and refused with the way
they are used when that is not one linear map."""

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import admm_kernels as ak
from admm_kernels.models.capture import capture_inputs
from admm_kernels.models.discovery import block_layers, find_blocks, get_weight, prunable_layers
from admm_kernels.models.experts import layer_input_hooks
from admm_kernels.models.plain_params import ParamLinear, trace_blocks, traced

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.usefixtures("one_thread")
H, L = 16, 12


class _PlainBlock(nn.Module):
    """Every way of multiplying by a parameter that tracing resolves, and one it refuses."""

    def __init__(self, mix_dtype=torch.float32):
        super().__init__()
        self.q = nn.Parameter(torch.randn(H, 2, H // 2))                 # einsum "blh,hnd->blnd"
        self.up = nn.Parameter(torch.randn(H, 2 * H) / 4)                # x @ up: (in, out)
        self.down = nn.Linear(2 * H, H)
        self.heads = nn.Parameter(torch.randn(2, H // 2, H // 2) / 3)    # per head: W @ columns
        self.mix = nn.Parameter(torch.randn(4, H).to(mix_dtype))        # F.linear(x, mix.float())
        self.scale = nn.Parameter(torch.randn(2, H))                     # elementwise: not a linear map
        self.seen: dict = {}

    def forward(self, x, **kwargs):
        n = x.shape[1]
        q = torch.einsum("blh,hnd->blnd", x, self.q).reshape(x.shape)
        u = torch.relu(q @ self.up)
        y = self.down(u)
        cols = y.reshape(1, n, 2, H // 2).permute(2, 0, 3, 1)              # (heads, 1, H/2, n)
        z = (self.heads[:, None] @ cols).permute(1, 3, 0, 2).reshape(1, n, H)
        m = F.linear(z, self.mix.float())
        self.seen = {"x": x, "q": q, "cols": cols, "z": z}
        return z * (1 + 0.1 * self.scale[0]) + m.sum(-1, keepdim=True)


class _PlainModel(nn.Module):
    def __init__(self, n_blocks=2, block=_PlainBlock, **kw):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n_blocks, max_position_embeddings=64)
        self.embed = nn.Embedding(32, H)
        self.layers = nn.ModuleList(block(**kw) for _ in range(n_blocks))
        self.head = nn.Linear(H, 32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for b in self.layers:
            h = b(h)
        return SimpleNamespace(logits=self.head(h))


def _tokens(n=2):
    return torch.randint(0, 32, (n, L), generator=torch.Generator().manual_seed(0))


def test_each_way_of_multiplying_becomes_an_out_in_view_of_its_parameter():
    model = _PlainModel().eval()
    _, blocks = find_blocks(model)
    found = traced(blocks[0])
    assert sorted(found.layers) == ["heads.0", "heads.1", "mix", "q", "up"]
    assert "used by" in found.refused["scale"]
    b = blocks[0]
    w = {k: get_weight(m) for k, m in found.layers.items()}
    # the views are the parameter's own storage, oriented (out, in)
    assert torch.equal(w["q"], b.q.reshape(H, H).t()) and w["q"].data_ptr() == b.q.data_ptr()
    assert torch.equal(w["up"], b.up.t())
    assert torch.equal(w["heads.1"], b.heads[1])
    assert torch.equal(w["mix"], b.mix)
    layers, routers = block_layers(b)
    # module order: the block's own parameters' maps at the block's place, before its submodules' layers
    assert list(layers) == ["q", "up", "heads.0", "heads.1", "mix", "down"] and not routers


def test_plain_layers_get_their_own_input_rows():
    model = _PlainModel().eval()
    _, blocks = find_blocks(model)
    b = blocks[0]
    layers = prunable_layers(b, "layers.0")
    rows: dict[str, list] = {}
    hooks = layer_input_hooks(layers, lambda name, x: rows.setdefault(name, []).append(x.clone()))
    try:
        with torch.no_grad():
            b(torch.randn(1, L, H))
    finally:
        hooks.remove()
    seen = b.seen
    assert torch.equal(rows["q"][0], seen["x"].reshape(-1, H))
    assert torch.equal(rows["up"][0], seen["q"].reshape(-1, H))
    for k in range(2):  # W @ cols: the columns of head k's input are its rows
        assert torch.equal(rows[f"heads.{k}"][0], seen["cols"][k].transpose(-1, -2).reshape(-1, H // 2))
    assert torch.equal(rows["mix"][0], seen["z"].reshape(-1, H))
    # the hooks are gone: another forward reports nothing
    before = sum(len(v) for v in rows.values())
    with torch.no_grad():
        b(torch.randn(1, L, H))
    assert sum(len(v) for v in rows.values()) == before


def test_prune_model_prunes_every_view_exactly_and_reports_the_refused_matrix():
    model = _PlainModel().eval()
    scale = [b.scale.detach().clone() for b in model.layers]
    report = ak.prune_model(model, _tokens(), sparsity=0.5, method="magnitude")
    names = {r["name"] for r in report["layers"]}
    assert {"layers.1.q", "layers.1.heads.0", "layers.1.heads.1", "layers.0.mix"} <= names
    for b in model.layers:
        for p in (b.q, b.up, b.mix):
            assert int((p == 0).sum()) == p.numel() // 2
        for k in range(2):  # each head on its own: exactly half of it
            assert int((b.heads[k] == 0).sum()) == b.heads[k].numel() // 2
    assert all(torch.equal(b.scale, s) for b, s in zip(model.layers, scale))
    left = {g["name"]: g for g in report["coverage"]["left_out"]}
    assert left["layers.N.scale"]["reason"] == "not a linear layer"
    assert "used by" in left["layers.N.scale"]["detail"]
    with torch.no_grad():
        assert torch.isfinite(model(_tokens(1)).logits).all()


def test_a_low_precision_parameter_cast_to_float32_is_followed_to_the_parameter():
    model = _PlainModel(mix_dtype=torch.bfloat16).eval()
    _, blocks = find_blocks(model)
    layers = traced(blocks[0]).layers
    assert "mix" in layers and get_weight(layers["mix"]).dtype == torch.bfloat16
    ak.prune_model(model, _tokens(), sparsity=0.5, method="magnitude")
    assert int((model.layers[0].mix == 0).sum()) == model.layers[0].mix.numel() // 2


class _Ambiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.a = nn.Parameter(torch.randn(H, 4))
        self.b = nn.Parameter(torch.randn(4, H))            # x @ (a @ b): a product of two parameters
        self.part = nn.Parameter(torch.randn(2 * H, H))     # only its first H rows are a weight
        self.tied = nn.Parameter(torch.randn(H, H))         # used as W and as W.t(): overlapping maps
        self.unused = nn.Parameter(torch.randn(H, H))

    def forward(self, x, **kwargs):
        x = self.lin(x)
        y = x @ (self.a @ self.b) + F.linear(x, self.part[:H])
        return y + F.linear(F.linear(y, self.tied), self.tied.t())


def test_uses_that_are_not_one_linear_map_keep_the_parameter_dense_with_the_reason():
    model = _PlainModel(block=_Ambiguous).eval()
    _, blocks = find_blocks(model)
    found = traced(blocks[0])
    assert not found.layers
    assert "product of two parameters" in found.refused["a"] and "product of two" in found.refused["b"]
    assert "only part of it" in found.refused["part"]
    assert "overlap" in found.refused["tied"]
    assert "never used" in found.refused["unused"]
    assert list(block_layers(blocks[0])[0]) == ["lin"]


def test_a_block_changed_after_tracing_is_traced_again():
    model = _PlainModel().eval()
    _, blocks = find_blocks(model)
    assert traced(blocks[0]).layers
    first = traced(blocks[0])
    find_blocks(model)
    assert traced(blocks[0]) is first  # the same candidates: kept
    blocks[0].extra = nn.Parameter(torch.randn(H, H))
    find_blocks(model)
    assert traced(blocks[0]) is not first and "never used" in traced(blocks[0]).refused["extra"]


def test_meta_weights_are_refused_not_traced():
    with torch.device("meta"):
        model = _PlainModel()
    blocks = model.layers
    from admm_kernels.models.discovery import plain_candidates
    trace_blocks(model, blocks, [plain_candidates(b) for b in blocks])
    assert "meta device" in traced(blocks[0]).refused["q"]


class _SeqBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x, **kwargs):
        assert x.shape[1] == 1, "called batch first"
        return self.lin(x)


class _SeqFirstModel(_PlainModel):
    """Passes (seqlen, 1, hidden) from block to block, as XLNet does."""

    def __init__(self):
        super().__init__(block=_SeqBlock)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids).transpose(0, 1)
        for b in self.layers:
            h = b(h)
        return SimpleNamespace(logits=self.head(h.transpose(0, 1)))


def test_sequence_first_hidden_states_are_captured_batch_first():
    """The activations are kept (n, seqlen, hidden) and each block is called in its own layout."""
    model = _SeqFirstModel().eval()
    ids = _tokens()
    hidden, calls = capture_inputs(model, model.layers, ids, torch.device("cpu"), torch.device("cpu"))
    assert hidden.shape == (2, L, H) and calls[0].batch_dim == 1
    with torch.no_grad():
        assert torch.equal(hidden[1], model.embed(ids[1]))
        out = calls[0](model.layers[0], hidden[:1])
        assert out.shape == (1, L, H)
        assert torch.allclose(out[0], model.layers[0].lin(model.embed(ids[0])))
    report = ak.prune_model(model, ids, sparsity=0.5, method="magnitude")
    assert all(r["sparsity"] == 0.5 for r in report["layers"])


def _verify(model, report):
    """Every pruned layer at exactly half zeros in its actual weight; the logits finite."""
    blocks_name, blocks = find_blocks(model)
    modules = {f"{blocks_name}.{i}.{rel}": m for i, b in enumerate(blocks)
               for rel, m in block_layers(b)[0].items()}
    pruned = [r for r in report["layers"] if r["error"] is not None]
    for r in pruned:
        w = get_weight(modules[r["name"]])
        assert int((w == 0).sum()) == w.numel() // 2 == r["numel"] - r["kept"], r["name"]
    return {r["name"]: modules[r["name"]] for r in pruned}


@pytest.mark.parametrize("arch, plain", [
    ("jetmoe", "mlp.input_linear.weight.3"),                 # F.linear on one expert's slice
    ("xlnet", "rel_attn.q"),                                 # einsum with (in, heads, head_dim); seq-first
    ("zamba", "mamba.x_proj_weight.7"),                      # per-head W @ x, broadcast over the batch
    ("deepseek_v4", "attn_hc.fn"),                           # F.linear(x, fn.float())
    ("inkling2_text", "self_attn.relative_position_bias.proj"),  # states @ proj
    ("inkling_text", "mlp.shared_experts.up_proj"),          # bmm with 3-D experts of no known layout
    ("gemma3n_text", None),                                  # stream-first hidden states
])
def test_tiny_models_with_plain_parameter_weights_prune_exactly(arch, plain):
    pytest.importorskip("transformers")
    from arch_sweep import build_tiny, tokens

    model = build_tiny(arch)
    report = ak.prune_model(model, tokens(2, 32), sparsity=0.5, method="magnitude")
    pruned = _verify(model, report)
    if plain is not None:
        hits = [n for n, m in pruned.items() if n.endswith("." + plain)]
        assert hits and all(isinstance(pruned[n], ParamLinear) for n in hits)
    assert report["coverage"]["share"] > 0.95
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens(1, 32), use_cache=False).logits).all()
    if arch == "jetmoe":  # the routers of its experts stay dense
        assert not any(".router." in n for n in pruned)


def test_block_tuning_moves_only_the_kept_weights_of_plain_layers():
    model = _PlainModel().eval()
    untuned = copy.deepcopy(model)
    scale = [b.scale.detach().clone() for b in model.layers]
    report = ak.prune_model(model, _tokens(4), sparsity=0.5, method="magnitude", tune_epochs=2, tune_batch=2)
    ak.prune_model(untuned, _tokens(4), sparsity=0.5, method="magnitude")
    assert report["block_tune"]["blocks"]
    for b, u in zip(model.layers, untuned.layers):
        for w, v in ((b.q, u.q), (b.up, u.up), (b.mix, u.mix), (b.heads, u.heads)):
            assert torch.equal(w == 0, v == 0) and not torch.equal(w, v)   # same zeros, tuned values
    assert all(torch.equal(b.scale, s) for b, s in zip(model.layers, scale))


def _maps_of(fn, w):
    """[(W (out, in) view, rows)] that the watching mode reports for fn(w)."""
    from admm_kernels.models.plain_params import _Sources, _Watch

    maps, others = [], []
    with _Watch(_Sources([w]), lambda src, spec, rows: maps.append((spec.view(w.data), rows)),
                lambda key, why: others.append(why)):
        y = fn(w)
    assert not others, others
    return y, maps


@pytest.mark.parametrize("case", ["linear", "x@w", "w@x", "bmm", "baddbmm", "einsum", "einsum-broadcast",
                                  "einsum-ellipsis"])
def test_every_reported_map_reproduces_its_part_of_the_output(case):
    """rows @ W.T of each reported map is exactly that map's share of the operation's output."""
    g = torch.Generator().manual_seed(1)
    x3 = torch.randn(3, 5, 6, generator=g)
    if case == "linear":
        w = nn.Parameter(torch.randn(4, 6, generator=g))
        y, maps = _maps_of(lambda w: F.linear(x3, w), w)
        parts = [y.reshape(-1, 4)]
    elif case == "x@w":
        w = nn.Parameter(torch.randn(6, 4, generator=g))
        y, maps = _maps_of(lambda w: x3 @ w, w)
        parts = [y.reshape(-1, 4)]
    elif case == "w@x":
        w = nn.Parameter(torch.randn(4, 5, generator=g))
        y, maps = _maps_of(lambda w: w @ x3, w)                     # (3, 4, 6): columns of x are the rows
        parts = [y.transpose(-1, -2).reshape(-1, 4)]
    elif case == "bmm":
        w = nn.Parameter(torch.randn(3, 4, 6, generator=g))          # per batch: (out, in) used transposed
        y, maps = _maps_of(lambda w: torch.bmm(x3, w.transpose(1, 2)), w)
        parts = list(y)
    elif case == "baddbmm":
        w = nn.Parameter(torch.randn(3, 6, 4, generator=g))
        y, maps = _maps_of(lambda w: torch.baddbmm(torch.ones(3, 1, 4), x3, w), w)
        parts = list(y - 1)
    elif case == "einsum":
        w = nn.Parameter(torch.randn(6, 2, 2, generator=g))          # (in, heads, head_dim)
        y, maps = _maps_of(lambda w: torch.einsum("abh,hnd->abnd", x3, w), w)
        parts = [y.reshape(-1, 4)]
    elif case == "einsum-broadcast":
        w = nn.Parameter(torch.randn(4, 6, 2, generator=g))          # x's batch of 1 meets 4 maps
        y, maps = _maps_of(lambda w: torch.einsum("bij,bjk->bik", x3[:1], w), w)
        parts = list(y)
    else:
        w = nn.Parameter(torch.randn(2, 6, generator=g))
        y, maps = _maps_of(lambda w: torch.einsum("...h,oh->...o", x3, w), w)
        parts = [y.reshape(-1, 2)]
    assert len(maps) == len(parts)
    for (weight, rows), part in zip(maps, parts):
        assert weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()   # a view, no copy
        assert torch.allclose(rows @ weight.t(), part, atol=1e-5)
