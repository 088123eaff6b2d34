"""Packing a group's tensors (params and buffers, mixed dtypes) into one flat host buffer."""

import logging

import pytest
import torch
from torch import nn

from offload import packing
from offload.packing import ALIGN_BYTES, GroupLayout, block_nbytes, block_tensors, pack_host


class Mixed(nn.Module):
    """fp8 weight + fp32 scale as buffers, bf16 bias parameter, a transposed fp32 parameter."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w8", torch.randn(16, 8, generator=g).to(torch.float8_e4m3fn))  # (out, in)
        self.register_buffer("scale", torch.rand(16, 1, generator=g))  # fp32, per output channel
        self.bias = nn.Parameter(torch.randn(16, generator=g).to(torch.bfloat16))
        self.proj_t = nn.Parameter(torch.randn(4, 16, generator=g).t())  # (16, 4), strides (1, 16)
        self.register_buffer("empty", torch.zeros(0, 3))


def _layout(blocks):
    return GroupLayout.build(list(enumerate(block_tensors(blocks))))


def test_layout_is_aligned_and_sizes_add_up():
    blocks = [Mixed(), Mixed()]
    layout = _layout(blocks)
    assert all(e.offset % ALIGN_BYTES == 0 for e in layout.entries)
    assert layout.nbytes == sum(block_nbytes(blocks))
    dtypes = {e.dtype for e in layout.entries}
    assert dtypes == {torch.float8_e4m3fn, torch.float32, torch.bfloat16}


def test_pack_host_repoints_to_one_buffer_and_frees_old_storage():
    block = Mixed()
    before = {name: t.clone() for name, t in list(block.named_parameters()) + list(block.named_buffers())}
    refs = [t.untyped_storage()._weak_ref() for t in before_tensors(block)]
    layout = _layout([block])
    host = pack_host(layout, pin=False)
    start, end = host.buffer.data_ptr(), host.buffer.data_ptr() + host.buffer.nbytes
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        assert torch.equal(t.float(), before[name].float()), name
        assert t.dtype == before[name].dtype and t.stride() == before[name].stride(), name
        if t.numel():
            assert start <= t.data_ptr() < end, f"{name} is not a view of the packed buffer"
    # the old storage is gone: host RAM holds one copy
    assert all(torch.UntypedStorage._expired(r) for r in refs)
    assert isinstance(block.bias, nn.Parameter)
    assert not host.pinned and host.pin_error is None


def before_tensors(block):
    return [t for _, t in list(block.named_parameters()) + list(block.named_buffers()) if t.numel()]


def test_transposed_parameter_keeps_its_strides():
    block = Mixed()
    pack_host(_layout([block]), pin=False)
    assert block.proj_t.stride() == (1, 16)


def test_pin_failure_leaves_pageable_copy(monkeypatch):
    def refuse(ptr, nbytes):
        raise RuntimeError("out of page-lockable memory")

    monkeypatch.setattr(packing, "_cuda_host_register", refuse)
    block = Mixed()
    host = pack_host(_layout([block]), pin=True)
    assert not host.pinned and "page-lockable" in host.pin_error
    assert block.w8.data_ptr() >= host.buffer.data_ptr()


def test_pin_error_code_and_unpin(monkeypatch):
    calls = []
    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: calls.append(("reg", n)) or 0)
    monkeypatch.setattr(packing, "_cuda_host_unregister", lambda ptr: calls.append(("unreg", ptr)) or 0)
    host = pack_host(_layout([Mixed()]), pin=True)
    whole_pages = -(-host.buffer.nbytes // packing.PAGE_BYTES) * packing.PAGE_BYTES
    assert host.pinned and calls == [("reg", whole_pages)] and host.pinned_nbytes == whole_pages
    assert host.buffer.data_ptr() % packing.PAGE_BYTES == 0
    host.unpin()
    host.unpin()  # second call does nothing
    assert not host.pinned and calls[1:] == [("unreg", host.buffer.data_ptr())]

    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: 2)
    host = pack_host(_layout([Mixed()]), pin=True)
    assert not host.pinned and "error 2" in host.pin_error


def test_not_enough_host_ram_refuses_with_numbers(monkeypatch):
    monkeypatch.setattr(packing, "_available_host_bytes", lambda: 100)
    block = Mixed()
    w8 = block.w8
    with pytest.raises(MemoryError, match=r"needs .* of host RAM but only 100 B is available"):
        pack_host(_layout([block]), pin=False)
    assert block.w8 is w8 and block.w8.data_ptr() == w8.data_ptr()  # untouched


def test_shared_tensor_between_blocks_is_refused():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="also used by block 0"):
        block_tensors([a, b])


def test_tied_tensor_inside_one_block_is_packed_once():
    block = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    block[1].weight = block[0].weight
    assert block_nbytes([block]) == [ALIGN_BYTES]
    pack_host(_layout([block]), pin=False)
    assert block[0].weight is block[1].weight


def test_tensor_subclass_is_refused():
    class Tagged(torch.Tensor):
        pass

    block = nn.Module()
    block.register_buffer("q", torch.Tensor._make_subclass(Tagged, torch.zeros(3)))
    with pytest.raises(TypeError, match="block 0: q is a Tagged"):
        block_tensors([block])


def test_no_warning_from_packing_itself(caplog):
    with caplog.at_level(logging.WARNING, logger="lowvram_kit.offload"):
        pack_host(_layout([Mixed()]), pin=False)
    assert caplog.records == []


def test_small_host_buffers_never_share_a_pinned_page(monkeypatch):
    ranges = []
    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: ranges.append((ptr, ptr + n)) or 0)
    keep = [pack_host(_layout([nn.Linear(2, 2)]), pin=True) for _ in range(20)]  # 512 bytes each
    ranges.sort()
    assert all(start % packing.PAGE_BYTES == 0 for start, _ in ranges)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    assert len(keep) == 20
