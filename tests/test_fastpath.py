"""The sampler's fast path: staged (deferred) publishing, no per-step host sync, transfers.

On CUDA a sample is published a few steps after it was taken, once its device-to-host copy has
landed. The CPU has nothing to wait for, so here a stager that makes every copy "land" late stands
in for the GPU: what goes out, in what order, and what checkpoints hold must not change. The
``cuda`` tests run where a GPU is present (``bench/gpu_check.sh`` runs them first).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gped.config import load_config
from gped.core.chain import TeacherChain
from gped.errors import GpedError
from gped.roles.sampler import SamplerRole
from gped.runtime import build_teacher_for, load_data
from gped.staging import HostStager, Staged, to_device
from gped.wire import Params, Targets

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class LateStaged(Staged):
    """Ready only after ``delay`` looks, like a copy still in flight."""

    def __init__(self, inner: Staged, delay: int):
        super().__init__({})
        self.inner, self.delay = inner, delay

    def ready(self) -> bool:
        self.delay -= 1
        return self.delay < 0

    def arrays(self):
        return self.inner.arrays()


class LateStager(HostStager):
    def __init__(self, delay: int):
        super().__init__("cpu")
        self.delay = delay

    def stage(self, tensors):
        return LateStaged(super().stage(tensors), self.delay)


def _role(cfg, sent):
    return SamplerRole(cfg, load_data(cfg), torch.device("cpu"), lambda topic, msg: sent.append((topic, msg)) or True)


def _same(a, b):
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert type(x) is type(y) and (x.step, x.sample) == (y.step, y.sample)
        if isinstance(x, Params):
            assert np.array_equal(x.params, y.params)
        else:
            assert isinstance(x, Targets) and np.array_equal(x.logits, y.logits) and np.array_equal(x.indices, y.indices)
            assert x.noise_seed == y.noise_seed


@pytest.mark.parametrize("mode", ["targets", "params"])
def test_late_copies_change_when_samples_leave_not_what_leaves(small_run, mode):
    cfg = load_config(small_run(mode=mode, steps=300))
    now, late = [], []
    a, b = _role(cfg, now), _role(cfg, late)
    b.stager = LateStager(delay=13)  # longer than the thinning interval: samples queue up
    out_a = [a.step() for _ in range(cfg.sampler.steps)]
    out_b = [b.step() for _ in range(cfg.sampler.steps)]
    assert sum(out_a) == 20 and sum(out_b) < 20 and len(b._pending) > 0  # some still in flight at the end
    assert b.state_dict()["samples_sent"] == 20 and not b._pending  # a checkpoint waits for them
    _same(now, late)
    assert [m.sample for t, m in late if t == b"p"] == list(range(20))


def test_a_checkpoint_covers_every_sample_up_to_the_chain_step(small_run):
    cfg = load_config(small_run(steps=300))
    sent = []
    role = _role(cfg, sent)
    role.stager = LateStager(delay=25)
    while role.chain.step < 200:
        role.step()
    state = role.state_dict()
    # steps 110, 120, ..., 200 are samples 0..9: all of them published before the state was taken
    assert state["samples_sent"] == 10 == len([m for t, m in sent if t == b"p"])
    resumed = _role(cfg, [])
    resumed.load_state_dict(state)
    assert resumed.chain.step == 200 and resumed.samples_sent == 10


def test_checkpoint_at_a_boundary_covers_exactly_the_boundary_samples(small_run):
    """What the sampler's loop does: right after the boundary sample is taken, checkpoint; with copies
    in flight the state must still cover exactly that many samples (as the students' checkpoints do)."""
    cfg = load_config(small_run(steps=300))
    role = _role(cfg, [])
    role.stager = LateStager(delay=25)
    while role.samples_taken < 5:
        role.step()
    assert role.samples_sent < 5  # some still in flight
    state = role.state_dict()
    assert state["samples_sent"] == 5 and role.chain.step == 150  # samples 0..4 are steps 110..150


def test_a_checkpoint_never_saves_a_diverged_chain(small_run):
    cfg = load_config(small_run(steps=300))
    role = _role(cfg, [])
    role.chain._check_every = 50  # as on CUDA: the loss is looked at every 50 steps
    for _ in range(51):
        role.step()
    with torch.no_grad():
        next(role.chain.model.parameters())[0, 0] = float("nan")
    role.step()  # step 52: its loss is not looked at yet
    with pytest.raises(GpedError, match="diverged by step 52"):
        role.state_dict()


def test_a_diverged_snapshot_is_refused_when_it_would_leave(small_run):
    cfg = load_config(small_run(steps=300))
    sent = []
    role = _role(cfg, sent)
    role.stager = LateStager(delay=3)
    role.chain._check = lambda step: None  # the loss check would see it first; here the snapshot's own check must
    while role.chain.step < 105:
        role.step()
    with torch.no_grad():
        next(role.chain.model.parameters())[0, 0] = float("nan")
    with pytest.raises(GpedError, match=r"diverged by step 110 \(non-finite parameters\)"):
        for _ in range(20):
            role.step()
    assert sent == []


def _chain(cfg, check_every):
    data = load_data(cfg)
    chain = TeacherChain(build_teacher_for(cfg, data), torch.from_numpy(data.labelled_x), torch.from_numpy(data.labelled_y), cfg.sampler)
    chain._check_every = check_every  # what a CUDA chain does; the CPU looks at every step
    return chain


def test_checking_the_loss_less_often_changes_nothing_but_when_divergence_is_seen(small_run):
    cfg = load_config(small_run(steps=300))
    every, sparse = _chain(cfg, 1), _chain(cfg, 50)
    for _ in range(250):
        every.advance()
        sparse.advance()
    for (k, v), w in zip(every.model.state_dict().items(), sparse.model.state_dict().values()):
        assert torch.equal(v, w), k
    assert every.last_loss == sparse.last_loss
    # a step size far too large: the CPU chain stops at the first bad loss, the sparse one within 50 steps
    bad = load_config(small_run(steps=300), ["sampler.step_size=10.0"])
    caught = {}
    for check_every in (1, 50):
        chain = _chain(bad, check_every)
        with pytest.raises(GpedError, match=r"diverged by step (\d+)") as info:
            for _ in range(1000):
                chain.advance()
        caught[check_every] = int(re.search(r"by step (\d+)", str(info.value)).group(1))
    assert caught[1] <= caught[50] < caught[1] + 50 + bad.sampler.thin


def test_to_device_on_the_cpu_copies_read_only_wire_buffers():
    wire = np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32)  # read-only, as from a frame
    t = to_device(wire, torch.device("cpu"))
    t += 1  # writable, and not an alias
    assert wire.tolist() == [0, 1, 2, 3, 4, 5] and t.tolist() == [1, 2, 3, 4, 5, 6]
    assert to_device(np.array([1, 2]), torch.device("cpu"), np.int64).dtype == torch.int64


@cuda
def test_cuda_staging_is_pinned_and_exact():
    device = torch.device("cuda")
    stager = HostStager(device)
    x = torch.randn(1 << 20, device=device)
    staged = stager.stage({"x": x * 2, "ok": torch.isfinite(x).all()})
    arrays = staged.arrays()
    assert staged.ready() and bool(arrays["ok"])
    assert np.array_equal(arrays["x"], (x * 2).cpu().numpy())
    # what leaves is ordinary memory: the pinned buffers go back to torch's cache at once
    assert staged._host == {} and arrays["x"].flags.owndata
    pinned = stager.stage({"y": x})
    assert pinned._host["y"].is_pinned()


@cuda
def test_cuda_to_device_roundtrip():
    wire = np.frombuffer(np.random.default_rng(0).standard_normal(1000).astype(np.float32).tobytes(), dtype=np.float32)
    t = to_device(wire, torch.device("cuda"))
    assert t.device.type == "cuda" and np.array_equal(t.cpu().numpy(), wire)


@cuda
def test_cuda_sampler_publishes_what_the_cpu_order_says(small_run):
    cfg = load_config(small_run(steps=300))
    sent = []
    role = SamplerRole(cfg, load_data(cfg), torch.device("cuda"), lambda topic, msg: sent.append((topic, msg)) or True)
    while not role.done:
        role.step()
    role.flush(wait=True)
    assert [m.sample for t, m in sent if t == b"p"] == list(range(20))
    assert all(np.isfinite(m.params).all() for t, m in sent if t == b"p")
