"""Each FastPaths speed-up computes what the plain step computes (tiny model; CUDA graphs on a GPU, opt-in)."""

import dataclasses

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.utils._python_dispatch import TorchDispatchMode

from palp_trainer.data import SubjectLatents
from palp_trainer.families.base import build
from palp_trainer.loops.solo import make_optimizer, train_step
from palp_trainer.objective import losses
from palp_trainer.objective.task import FastPaths, PalpModel, PalpTask
from tests.conftest import tiny_config
from tests.numerics import ALIGN_TOL, AlignScale

CPU = torch.device("cpu")
PLAIN = FastPaths()


def setup(images, tmp_path, device=CPU, precision="fp32", **overrides):
    config = tiny_config(images, tmp_path, precision=precision, **overrides)
    base, embedding, lora = build(config, device)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    data = SubjectLatents(base.vae, [s.images for s in config.subjects], 32, True, False, device, dtype)
    model = PalpModel(base)

    def task(fast, compute_dtype=dtype):
        return PalpTask(config, base, model, embedding.first_id, device, compute_dtype, fast)

    return task, base, embedding, lora, data


def terms_and_grads(task, batch, params):
    """(the step's terms, the gradients of their sum, the alignment term's scale: tests/numerics.py)."""
    with AlignScale() as spy:
        terms = task.training_step(batch)
    grads = torch.autograd.grad(sum(terms.values()), params)
    scale = task.config.align_weight * task.config.align_every * spy.scales[0] if spy.scales else 0.0
    return {k: v.detach() for k, v in terms.items()}, grads, scale


def assert_same_step(a, b, rtol, atol):
    """The denoising loss and the gradients to rtol/atol; the alignment term to ALIGN_TOL of its scale."""
    (terms_a, grads_a, _), (terms_b, grads_b, align_scale) = a, b
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        if k == "align_loss":
            assert abs(terms_a[k] - terms_b[k]) <= ALIGN_TOL * align_scale, (terms_a[k], terms_b[k], align_scale)
        else:
            torch.testing.assert_close(terms_a[k], terms_b[k], rtol=rtol, atol=atol)
    for x, y in zip(grads_a, grads_b):
        assert x.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_auto_picks_by_device_dtype_and_batch():
    # on CPU only the pre-trained prompts' batching (B <= 4) is on: the pinned fp32 losses of test_loop run it
    assert FastPaths.auto(CPU, torch.float32, distributed=False, batch_size=8) == PLAIN
    assert FastPaths.auto(CPU, torch.float32, distributed=False) == FastPaths(batch_pretrained=True)
    assert FastPaths.auto(CPU, torch.bfloat16, distributed=False) == FastPaths(lora_compute_dtype=True,
                                                                               batch_pretrained=True)
    cuda = torch.device("cuda")
    assert FastPaths.auto(cuda, torch.bfloat16, distributed=False, batch_size=1) == FastPaths(
        native_dtype=True, lora_compute_dtype=True, fold_alignment=True, batch_pretrained=True, channels_last=True,
        cuda_graphs=True)
    assert FastPaths.auto(cuda, torch.bfloat16, distributed=False, batch_size=16) == FastPaths(
        native_dtype=True, lora_compute_dtype=True, cuda_graphs=True)
    assert not FastPaths.auto(cuda, torch.float16, distributed=False).native_dtype
    ddp = FastPaths.auto(cuda, torch.bfloat16, distributed=True)
    assert not ddp.cuda_graphs and not ddp.native_dtype and ddp.lora_compute_dtype


def test_cuda_graphs_are_refused_on_cpu(subject_images, tmp_path):
    task, *_ = setup(subject_images, tmp_path)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        task(FastPaths(cuda_graphs=True))
    with pytest.raises(ValueError, match="native_dtype is for bf16"):
        task(FastPaths(native_dtype=True))


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_fold_alignment_equals_separate_calls(subject_images, tmp_path, beta):
    task, base, embedding, lora, data = setup(subject_images, tmp_path, beta=beta)
    plain, folded = task(PLAIN), task(FastPaths(fold_alignment=True))
    batch = plain.make_batch(torch.Generator().manual_seed(0), data, 2)
    alpha_bar = plain.alphas_cumprod[batch["t"]]
    x_t = losses.add_noise(batch["latents"], batch["eps"], alpha_bar)
    eps_pred, enc = plain.model(x_t, batch["t"], plain.prompt_ids[batch["subject"]], batch["time_ids"])
    x0_hat = losses.predict_x0(x_t, eps_pred, alpha_bar)
    calls = []
    handle = base.denoiser.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    want = plain.alignment_branch(x0_hat, batch, enc)
    n_plain = list(calls)
    calls.clear()
    got = folded.alignment_branch(x0_hat, batch, enc)
    handle.remove()
    assert n_plain == [2, 2, 2 if beta == 1.0 else 4] and calls == [6 if beta == 1.0 else 8]  # one UNet call
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-5)  # CFG (α = 7.5) scales fp32 noise
    assert not any(layer._forward_hooks for layer in folded.lora_layers) and not any(
        layer.disable_adapters for layer in folded.lora_layers)  # hooks gone, LoRA back on
    params = lora + [embedding.rows]
    assert_same_step(terms_and_grads(plain, batch, params), terms_and_grads(folded, batch, params), 1e-5, 1e-7)


@pytest.mark.parametrize("alignment", ["palp", "nfsd", "sds"])
def test_batch_pretrained_equals_one_call_per_prompt(subject_images, tmp_path, alignment):
    task, base, embedding, lora, data = setup(subject_images, tmp_path, alignment=alignment)
    split, batched = task(PLAIN), task(FastPaths(batch_pretrained=True))
    batch = split.make_batch(torch.Generator().manual_seed(0), data, 2)
    calls = []
    handle = base.denoiser.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    params = lora + [embedding.rows]
    want = terms_and_grads(split, batch, params)
    n_split = list(calls)
    calls.clear()
    got = terms_and_grads(batched, batch, params)
    handle.remove()
    n = 3 if alignment == "nfsd" else 2  # pre-trained prompts: ∅, y^c[, negative]
    tail = [2] if alignment == "palp" else []  # the personalized call
    assert n_split == [2] + [2] * n + tail and calls == [2, 2 * n] + tail
    assert_same_step(want, got, 1e-5, 1e-7)


def _route_adapters(unet, names):
    """peft's per-sample routing (`adapter_names=`, mixed batch) on every LoRA layer of a diffusers UNet."""
    def pre_hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}
    return [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]


def test_lora_from_row_equals_peft_mixed_batch_and_separate_calls(subject_images, tmp_path):
    """The fold adds each LoRA to the personalized rows alone; peft's own routing (adapter_names, with
    "__base__" rows) gives the same rows, and so do separate calls with the adapter off and on. (peft's
    routing is not used: it indexes with Python lists, a host-to-device copy per layer that a CUDA graph
    cannot capture, and gathers/scatters every routed activation.)"""
    task, base, *_ = setup(subject_images, tmp_path)
    plain = task(PLAIN)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    enc = torch.cat([plain.clean_enc.expand(2, -1, -1), torch.randn(2, 77, 32)])
    with torch.no_grad():
        base.denoiser.disable_adapters()
        off = base.denoiser(x, t, enc[:2]).sample
        base.denoiser.enable_adapters()
        on = base.denoiser(x, t, enc[2:]).sample
        with plain.lora_from_row(2):
            masked = base.denoiser(x.repeat(2, 1, 1, 1), t.repeat(2), enc).sample
        handles = _route_adapters(base.denoiser, ["__base__"] * 2 + ["default"] * 2)
        routed = base.denoiser(x.repeat(2, 1, 1, 1), t.repeat(2), enc).sample
        for h in handles:
            h.remove()
    assert (on - off).abs().max() > 1e-3  # the adapter matters
    separate = torch.cat([off, on])
    torch.testing.assert_close(masked, separate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed, separate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, routed, rtol=1e-5, atol=1e-6)


class CastCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_lora_in_compute_dtype_is_bit_identical_under_autocast(subject_images, tmp_path):
    """bf16 autocast: peft copies each LoRA input to fp32 and autocast copies it back; skipping both gives
    the same bits, with fewer casts. (On CPU: torch's CPU autocast follows the same cast rules.)"""
    task, base, embedding, lora, data = setup(subject_images, tmp_path, precision="bf16")
    plain, fast = task(PLAIN), task(FastPaths(lora_compute_dtype=True))
    batch = plain.make_batch(torch.Generator().manual_seed(0), data, 2)
    params = lora + [embedding.rows]
    counts = []
    for t in (plain, fast):
        with CastCount() as c:
            t.training_step(batch)
        counts.append(c.casts)
    a, b = terms_and_grads(plain, batch, params), terms_and_grads(fast, batch, params)
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert all(layer.cast_input_dtype_enabled for layer in fast.lora_layers)  # restored for evaluation
    assert counts[1] < counts[0] - len(fast.lora_layers), counts


@pytest.mark.parametrize("device,base_model", [("cpu", "tiny"), ("cpu", "tiny_xl"), pytest.param(
    "cuda", "tiny", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_native_dtype_is_as_close_to_fp32_as_autocast(subject_images, tmp_path, device, base_model):
    """bf16 without autocast (norms in bf16, LoRA masters cast once) against bf16 autocast: both are bf16
    approximations of the fp32 step; native's error to fp32 stays of the same size as autocast's.
    (CPU autocast keeps norms in bf16 too, so there the two agree exactly; CUDA's upcasts them.)"""
    task, base, embedding, lora, data = setup(subject_images, tmp_path, torch.device(device), precision="bf16",
                                              base_model=base_model)
    params = lora + [embedding.rows]
    names = [n for n, _ in base.denoiser.named_parameters()]
    autocast, native = task(FastPaths()), task(FastPaths(native_dtype=True))
    batch = autocast.make_batch(torch.Generator().manual_seed(0), data, 2)
    linears = [d["default"] for layer in native.lora_layers for d in (layer.lora_A, layer.lora_B)]
    masters = [m.weight for m in linears]
    got = terms_and_grads(native, batch, params)
    want = terms_and_grads(autocast, batch, params)
    assert [n for n, _ in base.denoiser.named_parameters()] == names  # the masters are registered again
    assert all(p.dtype == torch.float32 and isinstance(p, torch.nn.Parameter) for p in lora)
    assert all(m.weight is w and isinstance(w, torch.nn.Parameter) for m, w in zip(linears, masters))
    # fp32 reference: the same weights, upcast
    for module in base.frozen:
        module.float()
    ref = terms_and_grads(task(FastPaths(), torch.float32), {k: v.float() if v.is_floating_point() else v for k, v in batch.items()},
                          params)
    scale = ref[0]["denoise_loss"].abs()  # the summed loss's scale (the align term is a small difference)
    for k in ref[0]:
        err_native, err_autocast = (got[0][k] - ref[0][k]).abs(), (want[0][k] - ref[0][k]).abs()
        assert err_native <= max(3 * err_autocast, 0.02 * scale), (k, err_native, err_autocast)
    for g_native, g_autocast, g_ref in zip(got[1], want[1], ref[1]):
        assert g_native.dtype == torch.float32  # the grad lands on the fp32 master
        rel = lambda g: ((g - g_ref).norm() / g_ref.norm()).item()
        assert rel(g_native) < max(3 * rel(g_autocast), 0.05), (rel(g_native), rel(g_autocast))


def test_channels_last_equals_contiguous(subject_images, tmp_path):
    task, base, embedding, lora, data = setup(subject_images, tmp_path)
    plain = task(PLAIN)
    batch = plain.make_batch(torch.Generator().manual_seed(0), data, 2)
    params = lora + [embedding.rows]
    want = terms_and_grads(plain, batch, params)
    cl = task(FastPaths(channels_last=True))
    assert base.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_step(want, terms_and_grads(cl, batch, params), 1e-4, 1e-6)


HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.item.default}


class HostSyncs(TorchDispatchMode):
    """Ops that read device values on the host (.item(), nonzero, data-dependent shapes): a CUDA graph
    capture fails on each of them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = (func._overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_)
                         and any(i is not None and i.dtype == torch.bool for i in args[1]))
        if func in HOST_SYNCS or boolean_index or func._overloadpacket in (torch.ops.aten.unique_consecutive,
                                                                           torch.ops.aten._unique2):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("alignment,fold,base_model", [
    ("palp", True, "tiny"), ("palp", False, "tiny"), ("sds", False, "tiny"), ("nfsd", False, "tiny"),
    ("none", False, "tiny"), ("palp", True, "tiny_xl")])
def test_step_is_capturable_no_host_syncs(subject_images, tmp_path, alignment, fold, base_model):
    """What `capture` records, forward and backward, reads nothing back to the host (checked on CPU); SDXL's
    added conditioning (pooled text, time ids) included."""
    task, base, embedding, lora, data = setup(subject_images, tmp_path, precision="bf16", alignment=alignment, beta=2.0,
                                              base_model=base_model)
    fast = task(FastPaths(fold_alignment=fold, native_dtype=True, lora_compute_dtype=True, channels_last=True))
    batch = fast.make_batch(torch.Generator().manual_seed(0), data, 2)
    args = (batch["latents"], batch["eps"], batch["t"], batch["eps_align"], batch["subject"], batch["time_ids"])
    with HostSyncs() as mode:
        sum(fast.loss_terms(*args)).backward()
    assert mode.seen == []


# --- on a GPU (pytest -m gpu) ----------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("alignment,align_every", [("palp", 1), ("none", 1), ("nfsd", 1), ("palp", 2)])
def test_cuda_graphs_replay_the_eager_step(subject_images, tmp_path, alignment, align_every):
    """Three optimizer steps of loop.train_step: graphed and eager give the same losses and the same
    LoRA/placeholder weights (align_every 2: a graph with the alignment term and one without)."""
    cuda = torch.device("cuda")
    fast = FastPaths.auto(cuda, torch.bfloat16, distributed=False)
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        task, base, embedding, lora, data = setup(subject_images, tmp_path / str(graphs), cuda, "bf16",
                                                  alignment=alignment, align_every=align_every)
        t = task(dataclasses.replace(fast, cuda_graphs=graphs))
        optimizer = make_optimizer(t.config, lora, embedding)
        generator = torch.Generator().manual_seed(0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        logs = [train_step(t, data, optimizer, scaler, generator, 2, step=step) for step in range(3)]
        assert len(t.graphed) == (0 if not graphs else 2 if align_every == 2 else 1)
        results.append((logs, [p.detach().clone() for p in lora + [embedding.rows]]))
    (eager_logs, eager_w), (graph_logs, graph_w) = results
    for a, b in zip(eager_logs, graph_logs):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-2, abs=1e-4) for k in a)
    for a, b in zip(eager_w, graph_w):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
