"""Checkpoints: atomic, checksummed, no arbitrary unpickling; bound to their run's config and data."""

import io
import pickle

import pytest
import torch

from gped.checkpoint import TRAILER, load_checkpoint, save_checkpoint
from gped.config import load_config
from gped.errors import GpedError
from gped.roles.common import checkpoint_state, load_role_checkpoint


def test_roundtrip_keeps_tensors_and_generator_state(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(3, 4), "step": torch.tensor(7), "rng": gen.get_state(), "nested": {"x": [1, 2.5, "a"]}}
    path = save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and int(back["step"]) == 7 and back["nested"] == {"x": [1, 2.5, "a"]}
    twin = torch.Generator()
    twin.set_state(back["rng"])
    assert torch.equal(torch.randn(5, generator=twin), torch.randn(5, generator=gen))
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "no_trailer"])
def test_damaged_checkpoint_is_refused_with_one_clear_error(tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(100)})
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data = data[: -len(TRAILER) - 64]
    path.write_bytes(bytes(data))
    with pytest.raises(GpedError, match="checkpoint"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_not_executed_even_with_a_valid_checksum(tmp_path, capsys):
    import hashlib

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer, pickle_module=pickle)
    payload = buffer.getvalue()
    (tmp_path / "evil.pt").write_bytes(payload + TRAILER + hashlib.sha256(payload).hexdigest().encode())
    with pytest.raises(GpedError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_role_checkpoint_must_match_the_runs_config_and_data(tmp_path):
    cfg = load_config(None, [f'run_dir="{tmp_path}"'])
    path = save_checkpoint(tmp_path / "r.pt", checkpoint_state(cfg, "abc", {"x": torch.zeros(1)}))
    assert load_role_checkpoint(path, cfg, "abc")["x"].shape == (1,)
    with pytest.raises(GpedError, match="other data"):
        load_role_checkpoint(path, cfg, "def")
    other = load_config(None, [f'run_dir="{tmp_path}"', "students.0.lr=0.5"])
    with pytest.raises(GpedError, match="another config"):
        load_role_checkpoint(path, other, "abc")
    # a longer budget or other evaluation intervals are the same run: resuming with them is allowed
    longer = load_config(None, [f'run_dir="{tmp_path}"', "sampler.steps=2000000", "coordinator.eval_every=7"])
    assert load_role_checkpoint(path, longer, "abc") is not None
    assert load_role_checkpoint(tmp_path / "missing.pt", cfg, "abc") is None
