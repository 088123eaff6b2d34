"""offload.staging: copies through pinned windows give the bytes GroupLayout.fill gives, whatever the windows.

On the CPU the CUDA registration is replaced (packing._cuda_host_register), so the window logic runs with
synchronous copies: a window flushed in the wrong place, or over a tensor copied directly, shows up as
wrong bytes in the destination."""

import pytest
import torch
from torch import nn

from offload import packing
from offload.packing import GroupLayout, block_tensors
from offload.staging import StagedUpload
from offload.streams import backend_for


@pytest.fixture
def registered(monkeypatch):
    calls = []
    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: calls.append(("reg", ptr)) or 0)
    monkeypatch.setattr(packing, "_cuda_host_unregister", lambda ptr: calls.append(("unreg", ptr)) or 0)
    return calls


def _blocks():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(48, 40), nn.LayerNorm(40)).to(torch.bfloat16) for _ in range(3)]
    blocks[1][0].weight.data = torch.randn(48, 40).t()   # transposed (dense, not contiguous), fp32
    blocks[2].register_buffer("table", torch.arange(300, dtype=torch.int64))
    return blocks


def _layout(blocks):
    return GroupLayout.build(list(enumerate(block_tensors(blocks))))


def _expected(layout, values=None):
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.fill(flat, values)
    return flat


def _same_tensors(layout, a, b):
    return all(torch.equal(e.view(a), e.view(b)) for e in layout.entries)


class DirectFor(StagedUpload):
    """Treats the tensors in `direct` as already on the device: they are copied directly, between windows."""

    def __init__(self, direct, **kw):
        super().__init__(backend_for(torch.device("cpu")), **kw)
        self.direct = {id(t) for t in direct}

    def copies_directly(self, src):
        return id(src) in self.direct


@pytest.mark.parametrize("window_bytes", [256, 4096, 1 << 20])
def test_windows_give_the_bytes_of_a_plain_fill(registered, window_bytes):
    layout = _layout(_blocks())
    flat = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8)
    with StagedUpload(backend_for(flat.device), window_bytes=window_bytes) as up:
        up.fill(layout, flat)
    assert _same_tensors(layout, flat, _expected(layout))
    assert up.staged_bytes >= sum(e.nbytes for e in layout.entries)
    reg = [p for what, p in registered if what == "reg"]
    assert len(reg) == 2 and sorted(p for what, p in registered if what == "unreg") == sorted(reg)


def test_a_direct_copy_between_windows_is_not_overwritten(registered):
    blocks = _blocks()
    layout = _layout(blocks)
    middle = layout.entries[len(layout.entries) // 2]
    merged = torch.full(middle.shape, 3.0, dtype=middle.dtype)   # e.g. a weight with a LoRA merged on the GPU

    def values(t, device):
        return merged if t is middle.tensor else None

    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with DirectFor([merged], window_bytes=1 << 20) as up:   # one window could hold the whole group
        up.fill(layout, flat, values)
    assert torch.equal(middle.view(flat), merged)
    assert _same_tensors(layout, flat, _expected(layout, values))


def test_a_tensor_larger_than_the_window_widens_it(registered):
    big = nn.Linear(256, 256)   # 256 KiB weight against a 1 KiB window
    layout = _layout([big])
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with StagedUpload(backend_for(flat.device), window_bytes=1024) as up:
        up.fill(layout, flat)
    assert _same_tensors(layout, flat, _expected(layout))
    assert up.staged_bytes > 256 * 256 * 4


def test_refused_pinning_falls_back_to_the_plain_fill(monkeypatch):
    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: 2)
    layout = _layout(_blocks())
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with StagedUpload(backend_for(flat.device)) as up:
        up.fill(layout, flat)
    assert up.staged_bytes == 0
    assert _same_tensors(layout, flat, _expected(layout))


def test_a_replacement_of_the_wrong_shape_names_the_tensor(registered):
    layout = _layout(_blocks())
    first = layout.entries[0]
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    with StagedUpload(backend_for(flat.device)) as up, pytest.raises(ValueError, match="block 0: 0.weight"):
        up.fill(layout, flat, lambda t, d: torch.zeros(3) if t is first.tensor else None)
