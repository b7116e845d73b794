"""Checkpoint saves interrupted (Ctrl-C) at the two moments that matter: between the renames
that swap the new folder in, and while the previous one is being deleted."""
import os
import shutil

import pytest
import torch

from ryzen_llm import checkpoint as ckpt_mod
from ryzen_llm import ModelConfig, ScaledTransformerModel
from ryzen_llm.checkpoint import load_checkpoint, save_checkpoint

CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=16)


def model(seed):
    torch.manual_seed(seed)
    return ScaledTransformerModel(CONFIG)


def weight(path):
    return load_checkpoint(path).model_state["lm_head.weight"]


def test_interrupt_between_the_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last"
    first = model(0)
    save_checkpoint(path, first, {})
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".last.tmp-"):  # the new folder's rename
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model(1), {})
    monkeypatch.undo()
    assert torch.equal(weight(path), first.lm_head.weight)  # the previous one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # nothing half-written left


def test_interrupt_while_deleting_the_previous_one_blocks_no_later_save(tmp_path, monkeypatch):
    path = tmp_path / "last"
    save_checkpoint(path, model(0), {})
    real_rmtree = shutil.rmtree

    def rmtree(p, *args, **kwargs):
        if os.path.basename(p).startswith(".last.old-"):  # delete one file, then Ctrl-C
            os.remove(min(os.scandir(p), key=lambda e: e.name).path)
            raise KeyboardInterrupt
        return real_rmtree(p, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    second = model(1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, second, {})
    monkeypatch.undo()
    assert torch.equal(weight(path), second.lm_head.weight)  # the new one is in place
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last"]
    assert len(leftovers) == 1 and any((tmp_path / leftovers[0]).iterdir())  # half deleted
    third = model(2)
    save_checkpoint(path, third, {})  # the next save of the same path is not blocked
    assert torch.equal(weight(path), third.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # and cleans up
