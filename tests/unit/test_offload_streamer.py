"""BlockStreamer on the CPU "device": bit-identical outputs, one host copy, slot protocol, lifecycle."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offload import BlockStreamer, OffloadConfig, Plan, block_nbytes, offload_blocks, packing, plan

CPU = torch.device("cpu")
DIM = 32


class ToyBlock(nn.Module):
    """Norm, bf16 attention, fp8-stored projection with an fp32 per-channel scale, a buffer."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.LayerNorm(DIM)  # fp32
        self.qkv = nn.Linear(DIM, 3 * DIM).to(torch.bfloat16)
        nn.init.normal_(self.qkv.weight, std=0.2, generator=g)
        self.register_buffer("pos", torch.randn(1, DIM, generator=g))  # fp32 buffer
        self.register_buffer("w8", torch.randn(DIM, DIM, generator=g).to(torch.float8_e4m3fn))  # (out, in)
        self.register_buffer("scale", torch.rand(DIM, 1, generator=g) * 0.1)  # fp32 (out, 1)
        self.bias = nn.Parameter(torch.randn(DIM, generator=g).to(torch.bfloat16))
        self.mix_t = nn.Parameter(torch.randn(DIM, DIM, generator=g).t() * 0.1)  # non-contiguous fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, DIM) fp32
        h = self.norm(x + self.pos)
        q, k, v = self.qkv(h.bfloat16()).float().chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), dim=-1) @ v
        y = F.linear(a, self.w8.float() * self.scale) + self.bias.float()
        return x + y @ self.mix_t


def make_blocks(n: int = 8) -> list[ToyBlock]:
    return [ToyBlock(seed) for seed in range(n)]


def run(blocks, x):
    for block in blocks:
        x = block(x)
    return x


X = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(99))


def manual_plan(blocks, resident_n: int, chunk: int, prefetch: int) -> Plan:
    sizes = block_nbytes(blocks)
    n = len(sizes)
    streamed = [tuple(range(s, min(s + chunk, n))) for s in range(resident_n, n, chunk)]
    return Plan(block_bytes=tuple(sizes), groups=tuple((i,) for i in range(resident_n)) + tuple(streamed),
                resident=(True,) * resident_n + (False,) * len(streamed), prefetch=prefetch if streamed else 0,
                chunk_size=chunk, budget_bytes=sum(sizes), activation_bytes=0, margin_bytes=0,
                h2d_bytes_per_s=1e9, compute_s=None, predicted_s=0.0)


def module_tensors(blocks):
    return [t for b in blocks for t in list(b.parameters()) + list(b.buffers()) if t.numel()]


def inside(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return buffer.data_ptr() <= t.data_ptr() < buffer.data_ptr() + buffer.nbytes


PLANS = {
    "all resident": (8, 1, 1),
    "none resident, chunk 1, prefetch 1": (0, 1, 1),
    "none resident, chunk 2, prefetch 1": (0, 2, 1),
    "none resident, chunk 3, prefetch 2": (0, 3, 2),
    "none resident, chunk 1, prefetch 2": (0, 1, 2),
    "3 resident, chunk 2, prefetch 1": (3, 2, 1),
    "5 resident, chunk 1, prefetch 3 (more slots than groups)": (5, 1, 3),
}


@pytest.mark.parametrize("resident_n, chunk, prefetch", PLANS.values(), ids=PLANS.keys())
def test_outputs_are_bit_identical(resident_n, chunk, prefetch):
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, resident_n, chunk, prefetch), CPU).attach()
    for _ in range(3):  # several passes: prefetch wraps around the pass end
        assert torch.equal(run(blocks, X), expected)
    streamer.detach()
    assert torch.equal(run(blocks, X), expected)


@pytest.mark.parametrize("budget_blocks", [2, 3, 5, 7, 9])
def test_planned_budgets_are_bit_identical(budget_blocks):
    blocks = make_blocks()
    expected = run(blocks, X)
    size = max(block_nbytes(blocks))
    cfg = OffloadConfig(budget_bytes=budget_blocks * size, margin_bytes=0)
    with offload_blocks(blocks, cfg, CPU, activation_bytes=0, h2d_bytes_per_s=1e6) as streamer:
        assert streamer.device_bytes <= cfg.budget_bytes
        assert torch.equal(run(blocks, X), expected) and torch.equal(run(blocks, X), expected)


def test_spread_layout_plan_is_bit_identical():
    blocks = make_blocks()
    expected = run(blocks, X)
    sizes = block_nbytes(blocks)
    p = plan(sizes, budget_bytes=5 * max(sizes), activation_bytes=0, seconds_per_block=[1e-3] * 8,
             h2d_bytes_per_s=sum(sizes) / 8e-3)
    assert p.layout == "spread" and p.resident_blocks not in ((), (0, 1, 2))
    with BlockStreamer(blocks, p, CPU):
        assert torch.equal(run(blocks, X), expected) and torch.equal(run(blocks, X), expected)


def test_one_host_copy_after_attach():
    blocks = make_blocks()
    refs = [t.untyped_storage()._weak_ref() for t in module_tensors(blocks)]
    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 2, 1), CPU).attach()
    hosts = streamer._hosts
    for g in streamer.plan.streamed_groups:
        for i in streamer.plan.groups[g]:
            assert all(inside(t, hosts[g].buffer) for t in module_tensors([blocks[i]])), f"block {i}"
    for i in (0, 1):  # resident: views of the device arena; their original storage stays as the host copy
        assert all(inside(t, streamer._arena) for t in module_tensors([blocks[i]]))
    expired = [torch.UntypedStorage._expired(r) for r in refs]
    n_resident = len(module_tensors(blocks[:2]))
    assert not any(expired[:n_resident]) and all(expired[n_resident:])
    assert streamer.streamed_bytes_per_pass == sum(block_nbytes(blocks[2:]))
    assert streamer.resident_device_bytes == sum(block_nbytes(blocks[:2]))
    assert streamer.slot_device_bytes == 2 * sum(block_nbytes(blocks[2:4]))
    streamer.detach()


def test_detach_restores_modules_and_frees_everything():
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 1, 1), CPU).attach()
    run(blocks, X)
    device_refs = [streamer._arena.untyped_storage()._weak_ref()]
    device_refs += [s.buffer.untyped_storage()._weak_ref() for s in streamer._slots.slots]
    hosts = dict(streamer._hosts)
    streamer.detach()
    assert all(torch.UntypedStorage._expired(r) for r in device_refs), "device memory still referenced"
    assert streamer.device_bytes == 0 and streamer.pinned_host_bytes == 0 and streamer._copy_stream is None
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks), "hooks left behind"
    for g, host in hosts.items():  # streamed blocks now live in their packed (pageable) host buffer
        for i in streamer.plan.groups[g]:
            assert all(inside(t, host.buffer) for t in module_tensors([blocks[i]]))
    assert torch.equal(run(blocks, X), expected)


def test_detach_twice_and_attach_again():
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 0, 2, 1), CPU)
    assert streamer.attach() is streamer.attach()  # attaching twice is one attach
    assert sum(len(b._forward_pre_hooks) for b in blocks) == 8
    streamer.detach()
    streamer.detach()
    streamer.attach()
    assert torch.equal(run(blocks, X), expected)
    streamer.detach()
    assert torch.equal(run(blocks, X), expected)


class Boom(RuntimeError):
    pass


def test_detach_after_a_block_raised_midway():
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 1, 2, 1), CPU).attach()
    handle = blocks[5].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Boom("cancelled")))
    with pytest.raises(Boom):
        run(blocks, X)
    handle.remove()
    streamer.detach()
    assert not streamer.attached and streamer.device_bytes == 0
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)
    assert all(t.device.type == "cpu" for t in module_tensors(blocks))
    assert torch.equal(run(blocks, X), expected)


def test_failed_attach_leaves_nothing_attached(monkeypatch):
    blocks = make_blocks()
    expected = run(blocks, X)
    real = packing.pack_host
    calls = []

    def fail_on_third(layout, pin):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("offload: could not allocate host RAM (test)")
        return real(layout, pin)

    monkeypatch.setattr("offload.streamer.pack_host", fail_on_third)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 1, 1), CPU)
    with pytest.raises(MemoryError, match="test"):
        streamer.attach()
    assert not streamer.attached and streamer.device_bytes == 0 and streamer._hosts == {}
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)
    assert torch.equal(run(blocks, X), expected)


def test_plan_for_other_blocks_is_refused_before_anything_moves():
    blocks = make_blocks()
    other = manual_plan(make_blocks(), 0, 1, 1)
    blocks[3].extra = nn.Linear(4, 4)
    streamer = BlockStreamer(blocks, other, CPU)
    with pytest.raises(ValueError, match="block_nbytes"):
        streamer.attach()
    assert not streamer.attached


def test_slots_are_reused_round_robin_only_after_their_compute():
    blocks = make_blocks()
    streamer = BlockStreamer(blocks, manual_plan(blocks, 0, 1, 1), CPU, trace=True).attach()
    assert streamer.trace == [("copy", 0, 0), ("copy", 1, 1)]  # attach prefetches the first window
    run(blocks, X)
    run(blocks, X)
    trace = streamer.trace
    copies = [(g, s) for what, g, s in trace if what == "copy"]
    assert copies[:9] == [(g, g % 2) for g in range(8)] + [(0, 0)]  # round-robin, wrapping to group 0
    occupant, computed = {}, set()
    for what, g, s in trace:
        if what == "copy":
            if s in occupant:  # refilling: the previous occupant must have finished computing
                assert (occupant[s], s) in computed, f"slot {s} refilled before group {occupant[s]} was done"
            occupant[s] = g
            computed.discard((g, s))
        elif what == "done":
            computed.add((g, s))
    waits = [g for what, g, _ in trace if what == "wait"]
    assert waits == list(range(8)) * 2  # compute waits once per group, for that group only
    assert streamer.bytes_copied == streamer.copies * block_nbytes(blocks[:1])[0]
    streamer.detach()


def test_steady_state_copies_each_streamed_byte_once_per_pass():
    blocks = make_blocks()
    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 2, 1), CPU).attach()
    run(blocks, X)
    before = streamer.bytes_copied
    run(blocks, X)
    assert streamer.bytes_copied - before == streamer.streamed_bytes_per_pass
    streamer.detach()


def test_skipped_and_out_of_order_blocks_still_compute_right():
    blocks = make_blocks()
    order = [0, 1, 2, 4, 5, 7]  # a model that skips blocks 3 and 6 this step
    expected_skip = run([blocks[i] for i in order], X)
    expected_full = run(blocks, X)
    with BlockStreamer(blocks, manual_plan(blocks, 0, 1, 1), CPU):
        assert torch.equal(run([blocks[i] for i in order], X), expected_skip)
        assert torch.equal(run(blocks, X), expected_full)
        assert torch.equal(run(blocks[::-1][:3], X), run(blocks[::-1][:3], X))


@pytest.mark.parametrize("attach_inside", [False, True])
def test_runs_under_inference_mode(attach_inside):
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 2, 1), CPU)
    if attach_inside:
        with torch.inference_mode():
            streamer.attach()
    else:
        streamer.attach()
    with torch.inference_mode():
        assert torch.equal(run(blocks, X), expected) and torch.equal(run(blocks, X), expected)
    streamer.detach()
    assert torch.equal(run(blocks, X), expected)


def test_explicit_calls_without_hooks():
    blocks = make_blocks()
    expected = run(blocks, X)
    with BlockStreamer(blocks, manual_plan(blocks, 0, 2, 1), CPU, install_hooks=False) as streamer:
        assert not any(b._forward_pre_hooks for b in blocks)
        x = X
        for i, block in enumerate(blocks):
            streamer.before_block(i)
            x = block(x)
            streamer.after_block(i)
        assert torch.equal(x, expected)


def test_pin_failure_falls_back_to_pageable_with_one_warning(monkeypatch, caplog):
    calls = []

    def refuse(ptr, nbytes):
        calls.append(nbytes)
        return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(packing, "_cuda_host_register", refuse)
    blocks = make_blocks()
    expected = run(blocks, X)
    streamer = BlockStreamer(blocks, manual_plan(blocks, 0, 2, 1), CPU)
    streamer.pin_memory = True  # the CPU device never pins; pretend it is a CUDA device for packing
    with caplog.at_level(logging.WARNING, logger="lowvram_kit.offload"):
        streamer.attach()
    assert len(calls) == 1, "pinning must not be retried for every group"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "pageable" in warnings[0] and "11 GB/s" in warnings[0] and "55.6 GB/s" in warnings[0]
    assert streamer.pinned_host_bytes == 0
    assert torch.equal(run(blocks, X), expected)
    streamer.detach()


def fake_pinning(monkeypatch) -> dict:
    """cudaHostRegister/Unregister stand-ins: the returned dict maps each pinned pointer to its bytes."""
    registered = {}
    monkeypatch.setattr(packing, "_cuda_host_register", lambda ptr, n: registered.__setitem__(ptr, n) or 0)
    monkeypatch.setattr(packing, "_cuda_host_unregister", lambda ptr: registered.pop(ptr) and 0)
    return registered


def count_packing(monkeypatch) -> list:
    """One entry per group the streamer packs (pack_host calls)."""
    packed, real_pack = [], packing.pack_host
    monkeypatch.setattr("offload.streamer.pack_host", lambda layout, pin: packed.append(layout.nbytes) or
                        real_pack(layout, pin))
    return packed


def attached_pinned(blocks, plan, **kwargs) -> BlockStreamer:
    streamer = BlockStreamer(blocks, plan, CPU, **kwargs)
    streamer.pin_memory = True  # the CPU device never pins; pretend it is a CUDA device for packing
    return streamer.attach()


def test_pinned_buffers_are_unpinned_on_detach(monkeypatch):
    registered = fake_pinning(monkeypatch)
    blocks = make_blocks()
    streamer = attached_pinned(blocks, manual_plan(blocks, 3, 1, 1))
    assert streamer.pinned_host_bytes == sum(registered.values()) >= sum(block_nbytes(blocks[3:]))
    assert len(registered) == 5  # one registration per streamed group
    streamer.detach()
    assert registered == {} and streamer.pinned_host_bytes == 0


def test_cpu_device_never_touches_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched on the CPU device")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    monkeypatch.setattr(packing, "_cuda_host_register", no_cuda)
    blocks = make_blocks()
    with BlockStreamer(blocks, manual_plan(blocks, 0, 1, 1), CPU, pin_memory=True):
        run(blocks, X)


def test_unsupported_device_type_is_named():
    with pytest.raises(ValueError, match="'meta' is not supported"):
        BlockStreamer(make_blocks(2), manual_plan(make_blocks(2), 0, 1, 1), torch.device("meta"))


def test_streamer_does_not_change_the_callers_copy():
    blocks = make_blocks()
    twin = copy.deepcopy(blocks)
    with BlockStreamer(blocks, manual_plan(blocks, 0, 1, 1), CPU):
        run(blocks, X)
    for a, b in zip(module_tensors(blocks), module_tensors(twin)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_resident_values_replace_the_device_copy_only_and_come_back_on_detach():
    """A merged LoRA is computed once into the resident copy; the host tensors never change, streamed
    groups carry their own bytes, and detach gives the model back exactly as it was."""
    blocks = make_blocks(4)
    ref = run(blocks, X)
    before = [p.detach().clone() for b in blocks for p in b.parameters()]
    qkv0 = blocks[0].qkv.weight.detach().clone()
    doubled = {id(blocks[0].qkv.weight), id(blocks[3].qkv.weight)}  # block 0 resident, block 3 streamed
    asked = []

    def values(tensor, device):
        asked.append(id(tensor))
        return (tensor * 2).to(device) if id(tensor) in doubled else None

    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 1, 1), CPU, resident_values=values).attach()
    assert streamer.is_resident(0) and not streamer.is_resident(3)
    assert id(blocks[3].qkv.weight) not in asked  # only resident groups are asked
    assert torch.equal(blocks[0].qkv.weight, qkv0 * 2)
    out = run(blocks, X)
    streamer.detach()
    manual = copy.deepcopy(blocks)
    manual[0].qkv.weight.data *= 2
    assert torch.equal(out, run(manual, X)) and not torch.equal(out, ref)
    assert all(torch.equal(p, b) for p, b in zip((p for b in blocks for p in b.parameters()), before))
    assert torch.equal(run(blocks, X), ref)


def test_resident_values_of_another_dtype_are_refused_and_nothing_stays_attached():
    blocks = make_blocks(3)
    ref = run(blocks, X)

    def values(tensor, device):
        return tensor.float() if tensor.dtype == torch.bfloat16 else None

    streamer = BlockStreamer(blocks, manual_plan(blocks, 2, 1, 1), CPU, resident_values=values)
    with pytest.raises(ValueError, match="must match"):
        streamer.attach()
    assert not streamer.attached and streamer.device_bytes == 0
    assert torch.equal(run(blocks, X), ref)


@pytest.mark.parametrize("second", ["more resident", "fewer resident", "regrouped"])
def test_a_re_plan_adopts_the_host_buffers_of_groups_that_stay_streamed(monkeypatch, second):
    """Re-planning after the first step (detach, attach a new plan) packs and pins only groups that
    changed: a group of the same blocks streams from the buffer the last streamer left pinned. Nothing
    stays pinned that no streamer uses, and the output stays bit-identical."""
    registered = fake_pinning(monkeypatch)
    packed = count_packing(monkeypatch)
    blocks = make_blocks()
    expected = run(blocks, X)
    first = attached_pinned(blocks, manual_plan(blocks, 3, 1, 1))   # blocks 3-7 streamed, one per group
    assert len(packed) == 5 and len(registered) == 5
    hosts = first.detach(keep_hosts=True)
    assert set(hosts) == {(3,), (4,), (5,), (6,), (7,)} and len(registered) == 5  # still pinned, handed over
    resident_n, chunk, adopt = {"more resident": (5, 1, 3), "fewer resident": (1, 1, 5),
                                "regrouped": (3, 2, 1)}[second]   # (3, 4) (5, 6) new, (7,) kept
    packed.clear()
    again = attached_pinned(blocks, manual_plan(blocks, resident_n, chunk, 1), adopt_hosts=hosts)
    assert again.adopted_groups == adopt
    assert len(packed) == len(again.plan.streamed_groups) - adopt   # only new groups were packed
    assert sum(registered.values()) == again.pinned_host_bytes      # nothing pinned beyond what streams
    assert torch.equal(run(blocks, X), expected)
    again.detach()
    assert registered == {} and torch.equal(run(blocks, X), expected)


def test_hosts_handed_to_a_streamer_that_never_attaches_are_unpinned(monkeypatch):
    registered = fake_pinning(monkeypatch)
    blocks = make_blocks()
    first = attached_pinned(blocks, manual_plan(blocks, 3, 1, 1))
    hosts = first.detach(keep_hosts=True)
    BlockStreamer(blocks, manual_plan(blocks, 3, 1, 1), CPU, adopt_hosts=hosts).detach()
    assert registered == {}


def test_hosts_kept_unpinned_across_an_unload_are_re_pinned_not_re_packed(monkeypatch):
    """ComfyUI unloading the model releases the pinned pages (nothing page-locked stays behind), but the
    packed buffers are the model's host weights anyway: the next attach re-pins them instead of packing."""
    registered = fake_pinning(monkeypatch)
    packed = count_packing(monkeypatch)
    blocks = make_blocks()
    expected = run(blocks, X)
    first = attached_pinned(blocks, manual_plan(blocks, 3, 1, 1))
    hosts = first.detach(keep_hosts=True, unpin_kept=True)
    assert registered == {} and len(hosts) == 5 and not any(h.pinned for h in hosts.values())
    packed.clear()
    again = attached_pinned(blocks, manual_plan(blocks, 3, 1, 1), adopt_hosts=hosts)
    assert packed == [] and again.adopted_groups == 5 and len(registered) == 5
    assert torch.equal(run(blocks, X), expected)
    again.detach()
    assert registered == {}


def test_plan_for_keeps_the_preferred_room_for_activations_when_the_budget_allows():
    from offload import BudgetTooSmall, OffloadConfig, block_nbytes, floor
    from offload.api import plan_for

    sizes = block_nbytes([torch.nn.Linear(64, 64) for _ in range(6)])
    least, preferred = 1000, 9000
    enough = floor(sizes, preferred, margin_bytes=0).budget_bytes
    assert plan_for(OffloadConfig(budget_bytes=enough, margin_bytes=0), sizes, least,
                    preferred_activation_bytes=preferred).activation_bytes == preferred
    # one byte short of the preferred room: the plan keeps the least a call needs
    short = plan_for(OffloadConfig(budget_bytes=enough - 1, margin_bytes=0), sizes, least,
                     preferred_activation_bytes=preferred)
    assert short.activation_bytes == least
    # a preference below the least changes nothing; below the least's floor the refusal names that floor
    assert plan_for(OffloadConfig(budget_bytes=enough, margin_bytes=0), sizes, least,
                    preferred_activation_bytes=10).activation_bytes == least
    low = floor(sizes, least, margin_bytes=0).budget_bytes
    with pytest.raises(BudgetTooSmall) as info:
        plan_for(OffloadConfig(budget_bytes=low - 1, margin_bytes=0), sizes, least, preferred_activation_bytes=preferred)
    assert info.value.smallest_budget_bytes == low
