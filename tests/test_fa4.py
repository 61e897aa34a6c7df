"""speed.attention=fa4: falls back to cuDNN without the package or the GPU, and the custom op stays
one opaque call under torch.compile (CPU, with a stub kernel); on a GPU with flash-attn-4, a
transformer's output on FA4 matches cuDNN's up to bf16 noise.

Runs without the project's conftest (no Hydra needed): `python -m pytest --noconftest tests/test_fa4.py`.
"""

from __future__ import annotations

import logging

import pytest
import torch

from batch_runner.replica import fa4, speed


def reference_attention(query, key, value, scale, **kwargs):
    """A stand-in for FA4's forward: same layout (batch, tokens, heads, dim), returns (out, lse)."""
    q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=kwargs.get("softmax_scale", scale))
    return out.permute(0, 2, 1, 3).to(query.dtype), None


@pytest.fixture
def no_package(monkeypatch):
    monkeypatch.setattr(fa4, "_load", lambda: None)


@pytest.fixture
def stub_kernel(monkeypatch):
    calls = []

    def kernel(q, k, v, softmax_scale=None):
        calls.append(q.shape)
        return reference_attention(q, k, v, softmax_scale)

    monkeypatch.setattr(fa4, "_load", lambda: kernel)
    return calls


def test_without_the_package_fa4_is_not_chosen_and_says_so_once(no_package, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with caplog.at_level(logging.WARNING, logger=fa4.__name__):
        assert not fa4.chosen("fa4", 128, torch.device("cuda"))
    assert [r.getMessage() for r in caplog.records] == [
        "speed.attention=fa4: flash-attn-4 is not installed or does not import (README: FlashAttention-4); "
        "attention runs on cuDNN instead"
    ]


def test_an_import_failure_is_named_in_the_log_line(monkeypatch):
    """The real import, made to fail as a missing CUTLASS DSL would: the reason reaches the user."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise ImportError("No module named 'cutlass'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fa4._load.cache_clear()
    try:
        assert "ImportError: No module named 'cutlass'" in fa4.unavailable_reason(torch.device("cuda"))
    finally:
        fa4._load.cache_clear()


def test_on_an_unsupported_gpu_fa4_falls_back(stub_kernel, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with caplog.at_level(logging.WARNING, logger=fa4.__name__):
        assert not fa4.chosen("fa4", 128, torch.device("cuda"))
    assert "compute capability 8.6" in caplog.text


def test_auto_takes_fa4_only_at_head_sizes_measured_faster(stub_kernel, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa4, "FASTER_HEAD_DIMS", {9: frozenset({128})})
    cuda = torch.device("cuda")
    assert fa4.chosen("auto", 128, cuda)
    assert not fa4.chosen("auto", 64, cuda)
    assert not fa4.chosen("auto", 128, cuda, context_parallel=True)
    assert fa4.chosen("fa4", 64, cuda)
    assert not fa4.chosen("cudnn", 128, cuda)


def test_fa4_on_the_cpu_is_never_chosen(stub_kernel):
    assert not fa4.chosen("fa4", 128, torch.device("cpu"))
    assert fa4.unavailable_reason(torch.device("cpu")) == "cpu is not a CUDA device"


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({(9, 0)}, {"QUACK_ARCH": "90"}),
        ({(10, 3)}, {"QUACK_ARCH": "103"}),
        ({(9, 0), (8, 0)}, {}),  # GPUs of two generations: which one a run gets is not known here
        (set(), {}),  # NVML could not tell
    ],
)
def test_the_import_is_told_the_gpus_compute_capability_only_where_there_is_one(capabilities, expected, monkeypatch):
    """So that importing it in the warm server does not start CUDA's driver (quack asks torch otherwise)."""
    monkeypatch.delenv(fa4.QUACK_ARCH, raising=False)
    assert fa4.import_environment(capabilities) == expected
    monkeypatch.setenv(fa4.QUACK_ARCH, "80")  # the user's own stands
    assert fa4.import_environment(capabilities) == {}


def test_fa4_is_a_speed_attention_choice_that_keeps_cudnn_for_other_sdpa_calls():
    from torch.nn.attention import SDPBackend

    assert speed.backend_order("fa4")[0] == SDPBackend.CUDNN_ATTENTION


def test_the_custom_op_runs_the_kernel_and_matches_attention(stub_kernel):
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    out = fa4.fa4_attention(q, k, v, 8**-0.5)
    assert stub_kernel == [q.shape]
    assert torch.allclose(out, reference_attention(q, k, v, 8**-0.5)[0], atol=1e-5)


def test_a_call_the_kernel_fails_runs_on_sdpa_and_so_does_every_later_one(monkeypatch, caplog):
    """A failing kernel (a JIT compile, its kernel cache's file lock) must not fail every row: one
    warning, then SDPA for that call and all later ones; running out of memory stays the plan's."""
    calls = []

    def failing(q, k, v, softmax_scale=None):
        calls.append(q.shape)
        raise RuntimeError("could not acquire the lock within 15 s")

    monkeypatch.setattr(fa4, "_load", lambda: failing)
    monkeypatch.setattr(fa4, "_failure", [])
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger=fa4.__name__):
        for _ in range(2):
            out = fa4.fa4_attention(q, k, v, 8**-0.5)
            assert torch.allclose(out, reference_attention(q, k, v, 8**-0.5)[0], atol=1e-5)
    assert len(calls) == 1 and fa4.failure() == "RuntimeError: could not acquire the lock within 15 s"
    assert [r.getMessage() for r in caplog.records] == [
        "FlashAttention-4 failed (RuntimeError: could not acquire the lock within 15 s); "
        "attention runs on SDPA (cuDNN) from here on"
    ]

    def out_of_memory(q, k, v, softmax_scale=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fa4, "_load", lambda: out_of_memory)
    monkeypatch.setattr(fa4, "_failure", [])
    with pytest.raises(torch.OutOfMemoryError):
        fa4.fa4_attention(q, k, v, 8**-0.5)
    assert fa4.failure() is None


def test_the_custom_op_is_one_opaque_call_under_torch_compile(stub_kernel):
    """fullgraph=True fails on a graph break; the fake gives the output shape with a different value dim."""
    q, k = (torch.randn(2, 16, 2, 8) for _ in range(2))
    v = torch.randn(2, 16, 2, 4)

    def block(q, k, v):
        return fa4.fa4_attention(q * 2.0, k, v, 0.5).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), block(q, k, v), atol=1e-5)
    assert compiled(q, k, v).shape == (2, 16, 2)
    # The op is one node of the traced graph, not the kernel's Python traced through.
    traced = torch._dynamo.export(block)(q, k, v).graph_module
    ops = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert torch.ops.batch_runner.fa4_attention.default in ops


def test_the_custom_op_takes_a_text_of_any_length_in_one_graph(stub_kernel):
    """Cross-attention to a prompt of its own token count (Kandinsky 5, HunyuanVideo-1.5): with the key
    length marked dynamic, as speed.SteadyInputs marks it, one compiled graph serves every length."""
    from torch._dynamo.utils import counters

    from batch_runner import upstream

    def block(q, k, v):
        return fa4.fa4_attention(q * 2.0, k, v, 0.5)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")
    q = torch.randn(1, 16, 2, 8)
    for length in (5, 9, 30):
        k, v = (torch.randn(1, length, 2, 8) for _ in range(2))
        for text in (k, v):
            upstream.size_may_vary(text, 1)
        assert torch.allclose(compiled(q, k, v), block(q, k, v), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_masked_call_goes_to_sdpa_not_the_kernel(stub_kernel):
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    mask = torch.ones(16, 16, dtype=torch.bool)
    out = fa4.dispatcher_attention(q, k, v, attn_mask=mask)
    assert stub_kernel == []
    assert out.shape == q.shape


def test_the_dispatcher_routes_a_model_to_fa4_without_changing_the_process_default(stub_kernel):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model = small_wan(head_dim=8).bfloat16()
    default = _AttentionBackendRegistry.get_active_backend()[0]
    x, t, text = small_wan_inputs(torch.bfloat16, "cpu")
    with torch.no_grad():
        before = model(x, t, text, return_dict=False)[0].float()
        assert fa4.use_in(model) == 2 * len(model.blocks)  # self- and cross-attention of each block
        after = model(x, t, text, return_dict=False)[0].float()
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    assert len(stub_kernel) == 2 * len(model.blocks)
    assert (after - before).norm() / before.norm() < 1e-2


def test_processors_that_call_sdpa_themselves_run_it_on_fa4_with_all_their_arguments(stub_kernel):
    """CogVideoX's processor calls SDPA itself and takes the rotary embedding by keyword: the wrapper
    must keep it (a dropped keyword would change the output) and send the SDPA call to FA4."""
    model = small_cogvideox(head_dim=16).bfloat16()
    inputs = small_cogvideox_inputs()
    with torch.no_grad():
        before = model(**inputs, return_dict=False)[0].float()
        assert fa4.use_in(model) == len(model.transformer_blocks)
        assert fa4.use_in(model) == 0  # already wrapped: never twice
        after = model(**inputs, return_dict=False)[0].float()
    assert len(stub_kernel) == len(model.transformer_blocks)
    assert (after - before).norm() / before.norm() < 1e-2


def test_a_compiled_block_holds_the_fa4_op_as_one_call(stub_kernel):
    """The mode is entered inside the compiled block: dynamo traces it (fullgraph, no break) and the
    graph calls the custom op, not SDPA."""
    model = small_cogvideox(head_dim=16).bfloat16()
    fa4.use_in(model)
    block = model.transformer_blocks[0]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    width = 2 * 16  # heads x head size
    hidden, text = (torch.randn(1, n, width, dtype=torch.bfloat16) for n in (12, 4))
    temb = torch.randn(1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = block(hidden, text, temb)
        compiled = torch.compile(block.forward, fullgraph=True, backend=backend)(hidden, text, temb)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("fa4_attention" in t for t in targets)
    assert not any("scaled_dot_product_attention" in t for t in targets)
    assert all(torch.allclose(a.float(), b.float(), atol=1e-2) for a, b in zip(eager, compiled, strict=True))


def small_cogvideox(head_dim: int, heads: int = 2, layers: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=layers,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        max_text_seq_length=4,
        use_rotary_positional_embeddings=True,
    ).eval()


def small_cogvideox_inputs(head_dim: int = 16) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(1)
    cos, sin = get_3d_rotary_pos_embed(head_dim, ((0, 0), (4, 4)), (4, 4), 2)
    return {
        "hidden_states": torch.randn(1, 2, 4, 8, 8, dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 4, 16, dtype=torch.bfloat16),
        "timestep": torch.tensor([500]),
        "image_rotary_emb": (cos.bfloat16(), sin.bfloat16()),
    }


def small_wan(head_dim: int, heads: int = 2, layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=64,
    ).eval()


def small_wan_inputs(dtype: torch.dtype, device: str, frames: int = 3, size: int = 16):
    torch.manual_seed(1)
    x = torch.randn(1, 4, frames, size, size, dtype=dtype, device=device)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, 12, 32, dtype=dtype, device=device)
    return x, t, text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("route", ["dispatcher", "own-sdpa"])
def test_a_transformer_on_fa4_matches_cudnn_up_to_bf16_noise(head_dim, compiled, route):
    """dispatcher: a small Wan (diffusers' dispatcher); own-sdpa: a small CogVideoX (its processor
    calls SDPA itself). Both with cuDNN as the reference, random weights in bf16."""
    device = torch.device("cuda")
    if fa4.unavailable_reason(device):
        pytest.skip(fa4.unavailable_reason(device))
    outputs = []
    for use_fa4 in (False, True):
        if route == "dispatcher":
            model = small_wan(head_dim, heads=4).to(device, torch.bfloat16)
            model.set_attention_backend("_native_cudnn")
            x, t, text = small_wan_inputs(torch.bfloat16, "cuda", frames=5, size=32)
            blocks, inputs = model.blocks, {"hidden_states": x, "timestep": t, "encoder_hidden_states": text}
        else:
            model = small_cogvideox(head_dim, heads=4).to(device, torch.bfloat16)
            blocks, inputs = model.transformer_blocks, small_cogvideox_inputs(head_dim)
            inputs = {k: to_cuda(v) for k, v in inputs.items()}
        if use_fa4:
            assert fa4.use_in(model) > 0
        if compiled:
            speed.compile_blocks(blocks)
        with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            outputs.append(model(**inputs, return_dict=False)[0].float())
    reference, ours = outputs
    assert torch.isfinite(ours).all()
    relative = (ours - reference).norm() / reference.norm()
    assert relative < 1e-2, f"FA4 vs cuDNN relative difference {relative:.2e}"


def to_cuda(value):
    if isinstance(value, tuple):
        return tuple(to_cuda(v) for v in value)
    return value.cuda()


FIRST_CALL = """
import sys, torch
from batch_runner.replica import compile_cache, fa4
compile_cache.configure(sys.argv[1])
q = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
fa4.fa4_attention(q, q, q, 128 ** -0.5)
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kernel_one_process_compiled_is_loaded_by_the_next_from_the_compile_cache(tmp_path):
    """compile_cache.configure asks flash-attn-4 to keep its kernels: the first process writes them
    under the compile cache, the next finds them there and writes none."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from batch_runner.replica import compile_cache

    if fa4.unavailable_reason(torch.device("cuda")):
        pytest.skip(fa4.unavailable_reason(torch.device("cuda")))
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.FA4_ENABLED, compile_cache.FA4_DIR)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    folder = tmp_path / "cache"

    def kernels() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in (folder / compile_cache.FA4_SUBFOLDER).rglob("*.o")}

    def first_call() -> None:
        done = subprocess.run([sys.executable, "-c", FIRST_CALL, str(folder)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    first_call()
    written = kernels()
    assert written, "the first process kept no kernel"
    first_call()
    assert kernels() == written
