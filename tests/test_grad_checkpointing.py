"""Gradient checkpointing (`ResNet.set_grad_checkpointing`, `model.grad_checkpointing: true`): the same training
(loss, gradients, BatchNorm running statistics and `num_batches_tracked`, random stream, exact resume) for less
memory, in eager mode, compiled, under DDP, and for the 1001-layer pre-activation ResNet at half the memory.

Run as a script (`python test_grad_checkpointing.py on|off OUT`), this file measures one training step of
`preact_resnet1001` in its own process, for the memory test.
"""

from __future__ import annotations

import copy
import gc
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from faultinject import Crash
from torch import Tensor, nn

from resnet_lit import ResNetClassifier
from resnet_lit.cli import ResNetLitCLI
from resnet_lit.errors import ResNetLitError
from resnet_lit.models import create_model
from resnet_lit.models import resnet as resnet_module

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def saved_tensor_bytes(net: nn.Module, images: Tensor, targets: Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one training step (which it runs)."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(net(images), targets)
    loss.backward()
    return sum(storages.values())


def batch(size: int = 8, image_size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, image_size, image_size, generator=generator), torch.arange(size) % 10


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("resnet20", {}), ("preact_resnet164", {"layers": (2, 2, 2), "widths": (4, 8, 8)})],
    ids=["post", "pre"],
)
def test_checkpointed_training_equals_plain_training(arch: str, overrides: dict) -> None:
    """With drop-path, 3 SGD steps: same losses and gradients, same running statistics and `num_batches_tracked`
    (not counted twice by the recomputation), same random stream afterwards."""
    torch.manual_seed(0)
    plain = create_model(arch, drop_path=0.2, **overrides)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    buffers_before = {name: id(b) for name, b in checkpointed.named_buffers()}
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in (plain, checkpointed)]
    for step in range(3):
        images, targets = batch(image_size=16, seed=step)
        results = []
        for net, optimizer in zip((plain, checkpointed), optimizers, strict=True):
            torch.manual_seed(step)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(images), targets)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, torch.rand(2)))
            optimizer.step()
        (plain_loss, plain_grads, plain_next), (loss, grads, next_random) = results
        assert torch.equal(loss, plain_loss), step
        torch.testing.assert_close(grads, plain_grads, atol=1e-6, rtol=0)
        assert torch.equal(next_random, plain_next), "the recomputation moved the random stream"
    plain_state, state = plain.state_dict(), checkpointed.state_dict()
    torch.testing.assert_close(state, plain_state, atol=1e-6, rtol=0)
    assert state["stages.0.0.bn1.num_batches_tracked"] == 3 and state["stages.2.1.bn1.num_batches_tracked"] == 3
    # The same buffer objects as before: DDP holds references to them to broadcast rank 0's values.
    assert {name: id(b) for name, b in checkpointed.named_buffers()} == buffers_before


def test_checkpointing_keeps_only_the_block_inputs() -> None:
    torch.manual_seed(0)
    net = create_model("resnet20")
    images, targets = batch(image_size=16)
    plain = saved_tensor_bytes(net, images, targets)
    net.set_grad_checkpointing()
    checkpointed = saved_tensor_bytes(net, images, targets)
    assert checkpointed < 0.4 * plain, (checkpointed, plain)
    net.set_grad_checkpointing(False)
    assert saved_tensor_bytes(net, images, targets) == plain


def test_only_training_with_gradients_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[nn.Module] = []
    real = resnet_module.checkpointed_call
    monkeypatch.setattr(resnet_module, "checkpointed_call", lambda block, x: calls.append(block) or real(block, x))
    net = create_model("resnet20", layers=(1, 1, 1), widths=(4, 8, 8), stem_width=4)
    net.set_grad_checkpointing()
    images, _ = batch(size=2, image_size=16)
    net.train()
    net(images)
    assert calls == [stage[0] for stage in net.stages]
    calls.clear()
    with torch.no_grad():
        net(images)
    net.eval()
    net(images)
    assert calls == []


def plain_network(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A model factory (dotted path `test_grad_checkpointing.plain_network`) without set_grad_checkpointing."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def test_grad_checkpointing_option_sets_the_network_and_rejects_networks_without_it() -> None:
    model = ResNetClassifier(arch="resnet20", grad_checkpointing=True)
    assert model.net.grad_checkpointing and not ResNetClassifier(arch="resnet20").net.grad_checkpointing
    with pytest.raises(ResNetLitError, match=r"model.grad_checkpointing: true needs .* 'test_grad_checkpointing"):
        ResNetClassifier(arch="test_grad_checkpointing.plain_network", grad_checkpointing=True)


def tiny_fit(root: Path, *extra: str) -> ResNetLitCLI:
    """6 steps (epochs of 4) of a 3-block ResNet-20 with drop-path and BatchNorm on synthetic data, saving
    `last.ckpt` every 2 steps."""
    return ResNetLitCLI(args=[
        "fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "6",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(root), *QUIET,
        "--model.arch", "resnet20", "--model.net.layers", "[1, 1, 1]", "--model.net.widths", "[4, 8, 8]",
        "--model.net.stem_width", "4", "--model.net.drop_path", "0.2",
        "--data", "resnet_lit.data.SyntheticDataModule", "--data.image_size", "16", "--data.num_samples", "32",
        "--data.num_val_samples", "8", "--data.batch_size", "8", "--data.loader", "device", *extra,
    ])  # fmt: skip


def final_weights(root: Path) -> dict[str, Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_cli_fit_with_grad_checkpointing_trains_as_without_and_resumes_exactly(tmp_path: Path) -> None:
    on = ["--model.grad_checkpointing", "true"]
    tiny_fit(tmp_path / "plain")
    checkpointed = tiny_fit(tmp_path / "checkpointed", *on)
    assert checkpointed.model.net.grad_checkpointing and checkpointed.trainer.global_step == 6
    reference = final_weights(tmp_path / "plain")
    torch.testing.assert_close(final_weights(tmp_path / "checkpointed"), reference, atol=1e-6, rtol=0)
    assert final_weights(tmp_path / "checkpointed")["net.stages.0.0.bn1.num_batches_tracked"] == 6

    with pytest.raises(Crash):  # before step 3: resumes from the checkpoint of step 2
        tiny_fit(tmp_path / "resumed", *on, "--trainer.callbacks+=faultinject.CrashAtStep",
                 "--trainer.callbacks.step=3")  # fmt: skip
    resumed = tiny_fit(tmp_path / "resumed", *on, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    torch.testing.assert_close(final_weights(tmp_path / "resumed"), reference, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ddp_fit_with_grad_checkpointing(tmp_path: Path) -> None:
    """Two gloo processes with BatchNorm: no DDP error (non-reentrant checkpointing needs neither static_graph nor
    find_unused_parameters), and each BatchNorm counted each step once."""
    from test_distributed import run_cli

    run_cli(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *QUIET, "--trainer.max_steps", "4",
             "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
             "--trainer.strategy", "ddp", "--data.init_args.batch_size", "16", "--model.grad_checkpointing", "true",
             "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["grad_checkpointing"] is True
    assert checkpoint["state_dict"]["net.stages.0.0.bn1.num_batches_tracked"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_compiled_checkpointed_training_matches_eager_and_keeps_less() -> None:
    """`compile: true` with checkpointing: one graph, the compiler recomputes the blocks (less kept for the
    backward pass), gradients and BatchNorm statistics as in eager mode without checkpointing."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    eager = create_model("resnet20", layers=(2, 2, 2), widths=(4, 8, 8), stem_width=4)
    eager = eager.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.set_grad_checkpointing()
    images, targets = batch(size=4, image_size=16)
    images = images.contiguous(memory_format=torch.channels_last)
    dynamo.reset()
    explanation = dynamo.explain(copy.deepcopy(compiled))(images)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    dynamo.reset()
    compiled.compile()
    eager_bytes = saved_tensor_bytes(eager, images, targets)
    compiled_bytes = saved_tensor_bytes(compiled, images, targets)
    assert compiled_bytes < 0.6 * eager_bytes, (compiled_bytes, eager_bytes)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-4, rtol=1e-3, msg=name)
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), atol=1e-5, rtol=1e-4)
    assert compiled.state_dict()["stages.0.0.bn1.num_batches_tracked"] == 1


# --- acceptance: preact_resnet1001 at half the memory ---------------------------------------------------------

BIG_BATCH = 32


def measure_training_step(checkpointing: bool, out: Path) -> None:
    """One forward and backward pass at batch 32 on 32x32 images; saves the growth of the peak resident memory
    over the built model (KiB), the gradients and the buffers to `out`."""
    torch.manual_seed(0)
    net = create_model("preact_resnet1001")
    net.set_grad_checkpointing(checkpointing)
    net.train()
    images, targets = batch(BIG_BATCH)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    F.cross_entropy(net(images), targets).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {name: p.grad for name, p in net.named_parameters()}
    torch.save({"peak_kib": peak - before, "grads": grads, "buffers": dict(net.named_buffers())}, out)


@pytest.mark.slow
def test_preact_resnet1001_needs_at_most_half_the_memory_with_the_same_step(tmp_path: Path) -> None:
    # Freed tensors go back to the system at once (no dynamic mmap threshold keeping them in malloc's heap), so
    # the peak resident size counts the tensors alive together. One thread: ~25 s a step, also on shared CPUs.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    results = {}
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.pt"
        done = subprocess.run([sys.executable, __file__, mode, str(out)], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = torch.load(out, weights_only=True)
    off, on = results["off"], results["on"]
    print(f"peak memory growth: {off['peak_kib'] / 1024:.0f} MiB without, {on['peak_kib'] / 1024:.0f} MiB with")
    assert on["peak_kib"] <= 0.5 * off["peak_kib"], (on["peak_kib"], off["peak_kib"])
    torch.testing.assert_close(on["grads"], off["grads"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on["buffers"], off["buffers"], atol=0, rtol=0)


if __name__ == "__main__":
    measure_training_step(sys.argv[1] == "on", Path(sys.argv[2]))
