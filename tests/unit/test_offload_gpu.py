"""Block streaming on a CUDA device: real side stream, events, pinned pages. Skipped without CUDA."""

import copy

import pytest
import torch

from offload import BlockStreamer, block_nbytes, plan
from offload.selfcheck import main as selfcheck

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")


def _blocks():
    # The CPU tests' toy blocks (fp8 + scale, bf16, fp32). Loaded by path: pytest runs in importlib mode,
    # where test modules are not importable by bare name.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_offload_streamer_toys", Path(__file__).with_name("test_offload_streamer.py"))
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    return toys.make_blocks(8)


def _run(blocks, x):
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("budget_blocks", [2, 3, 5])
def test_streamed_equals_resident_and_frees_everything(budget_blocks):
    blocks = _blocks()
    x = torch.randn(2, 5, 32, device=CUDA)
    resident = [b.to(CUDA) for b in copy.deepcopy(blocks)]  # same weights (biases use the global RNG)
    expected = _run(resident, x)
    sizes = block_nbytes(blocks)
    p = plan(sizes, budget_bytes=budget_blocks * max(sizes), activation_bytes=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    streamer = BlockStreamer(blocks, p, CUDA).attach()
    # the caching allocator rounds each allocation up to 512 bytes
    assert 0 <= torch.cuda.memory_allocated() - before - streamer.device_bytes < 512 * (p.slot_count + 1)
    assert streamer.pinned_host_bytes >= streamer.streamed_bytes_per_pass
    for _ in range(3):
        assert torch.equal(_run(blocks, x), expected)
    streamer.detach()
    assert torch.cuda.memory_allocated() == before and streamer.pinned_host_bytes == 0
    assert all(t.device.type == "cpu" for b in blocks for t in b.parameters())


def test_detach_after_failed_forward_on_cuda():
    blocks = _blocks()
    x = torch.randn(2, 5, 32, device=CUDA)
    sizes = block_nbytes(blocks)
    streamer = BlockStreamer(blocks, plan(sizes, budget_bytes=2 * max(sizes), activation_bytes=0), CUDA).attach()
    handle = blocks[4].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(blocks, x)
    handle.remove()
    before_detach, held = torch.cuda.memory_allocated(), streamer.device_bytes
    streamer.detach()
    streamer.detach()
    assert held > 0 and 0 <= before_detach - torch.cuda.memory_allocated() - held < 512 * 3


def test_selfcheck_small():
    assert selfcheck(["--blocks", "6", "--dim", "256", "--hidden", "768", "--tokens", "256", "--passes", "2"]) == 0
