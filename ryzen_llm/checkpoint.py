"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

A checkpoint is a folder:
    model.safetensors       weights
    optimizer.safetensors   optimizer tensors (AdamW moments, step counts)
    state.json              optimizer param groups, trainer state (step, epoch, history), config
    tokenizer.json          the tokenizer the model was trained with (when there is one)
    manifest.json           sha256 and size of every file above; written last

It is written to a temporary folder beside the destination and renamed into place, so a reader
sees either the old checkpoint or the complete new one, never a half-written file. An interrupt
(Ctrl-C) at any point of a save leaves the previous checkpoint or the new one in place, and the
next save of the same path works. Loading checks the manifest and names the file that is
missing or does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    config: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(pid)][key] = {"tensor": f"state.{pid}.{key}"}
            else:
                meta["state"][str(pid)][key] = {"value": value}
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {
            key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entries.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Writes the checkpoint folder atomically; an existing checkpoint at path is replaced only
    once the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        state: dict[str, Any] = {"config": config, "trainer": trainer_state or {}}
        if optimizer is not None:
            tensors, meta = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = meta
        rng = torch.get_rng_state()
        state["trainer"] = {**state["trainer"], "torch_rng_state": rng.tolist()}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        manifest = {
            f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size}
            for f in sorted(tmp.iterdir())
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # Swap: the previous checkpoint moves aside (a unique name, so that one a save
        # interrupted while deleting it never blocks this one), the new one takes its place,
        # then the previous one and any such leftovers are deleted.
        old = None
        try:
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            # interrupted between the two renames (the file system says where things are, not
            # a flag an interrupt could beat): put the previous checkpoint back
            if old is not None and not path.exists() and (old / MANIFEST_FILE).exists():
                os.replace(old, path)
            raise
        for stale in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def verify_checkpoint(path: str | Path) -> None:
    """Raises CheckpointError naming the first file that is missing or does not match."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({exc})") from None
    for name in (MODEL_FILE, STATE_FILE):
        if name not in manifest:
            raise CheckpointError(f"checkpoint {str(path)!r}: manifest lists no {name}")
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: corrupt (size or sha256 differs from the manifest)")


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        model_state = load_file(str(path / MODEL_FILE))
        state = json.loads((path / STATE_FILE).read_text())
        optimizer_state = None
        if "optimizer" in state and (path / OPTIMIZER_FILE).is_file():
            optimizer_state = _join_optimizer_state(
                load_file(str(path / OPTIMIZER_FILE)), state["optimizer"]
            )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors / json errors on a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise CheckpointError(f"{path / STATE_FILE}: holds no config")
    return Checkpoint(path, model_state, optimizer_state, state.get("trainer", {}), state["config"])


def restore_rng(trainer_state: dict[str, Any]) -> None:
    if "torch_rng_state" in trainer_state:
        torch.set_rng_state(torch.tensor(trainer_state["torch_rng_state"], dtype=torch.uint8))
