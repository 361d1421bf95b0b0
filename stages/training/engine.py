"""Training engines: DeepSpeed ZeRO through accelerate, or plain single-process torch.

The only module that imports deepspeed or accelerate; the loop talks to `Engine` and does not care
which one runs. DeepSpeed configs live in `launch/deepspeed/`; this module fills in what must match
the run (micro batch, gradient clipping, mixed precision only on GPU). On CPU, processes talk over
gloo: accelerate needs `InitProcessGroupKwargs(backend="gloo")` for that, since `cpu=True` would
silently drop DeepSpeed. Launch several processes with `torchrun --nproc_per_node N -m pipeline ...`;
started without torchrun, the engine makes the one-process group `torchrun --nproc_per_node 1` would
(the demo trains this way), and each training stage of a run gets a fresh accelerate state.

    engine = make_engine(deepspeed_config="launch/deepspeed/zero2.json", micro_batch=32, grad_clip=1.0,
                         accumulation=2)
    model, optimizer = engine.prepare(model, optimizer)
    engine.backward(loss_1, is_last=False); engine.backward(loss_2, is_last=True); engine.step()

Gradient accumulation: `accumulation` micro batches per optimizer step, each loss a mean over its
micro batch, the gradient their mean. A checkpoint written by another number of processes is loaded
through DeepSpeed's universal checkpoint: rank 0 converts the ZeRO files once with DeepSpeed's own
`ds_to_universal` into `<checkpoint>/universal/`, and every rank loads its new partition from there
(`checkpoint.load_universal`, docs: deepspeed.ai/tutorials/universal-checkpointing).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from shards.atomic import atomic_write


class Engine(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model, optimizer): ...

    def backward(self, loss: torch.Tensor, is_last: bool = True) -> None: ...

    def step(self) -> None: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path, saved_world_size: int | None = None) -> None: ...

    def unwrap(self, model): ...

    def barrier(self) -> None: ...


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to this rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def gather_ints(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's equally long int64 vector, concatenated in rank order (all ranks must call it)."""
    values = values.to(device=device, dtype=torch.int64)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.cpu()
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.cat(parts).cpu()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank passed (every rank must call this, like any collective); `value`
    itself when no process group of several processes is running. The ranks' way to agree on a
    decision, e.g. "did every rank load this checkpoint": pass 1 for yes, 0 for no."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


class PlainEngine:
    """One process, plain torch: clip the gradient norm, step, zero."""

    rank, world_size = 0, 1

    def __init__(self, grad_clip: float | None, device: str = "cpu", accumulation: int = 1) -> None:
        self.grad_clip, self.device, self.accumulation = grad_clip, torch.device(device), accumulation
        self.model = self.optimizer = None

    def prepare(self, model, optimizer):
        self.model, self.optimizer = model.to(self.device), optimizer
        return self.model, self.optimizer

    def backward(self, loss: torch.Tensor, is_last: bool = True) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        if self.grad_clip:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        """`folder/state.pt`, written under a temporary name and renamed into place."""
        with atomic_write(folder / "state.pt") as handle:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, handle)

    def load(self, folder: Path, saved_world_size: int | None = None) -> None:
        state = torch.load(folder / "state.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def unwrap(self, model):
        return model

    def barrier(self) -> None:
        pass


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the config file) through accelerate; gradient clipping is done by
    DeepSpeed after unscaling."""

    def __init__(
        self, config: dict, micro_batch: int, grad_clip: float | None, accumulation: int = 1
    ) -> None:
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.state import AcceleratorState
        from accelerate.utils import InitProcessGroupKwargs

        _one_process_group_unless_launched()
        # a second training stage in the same process (finetune, then realign) needs its own plugin;
        # accelerate refuses a new deepspeed_plugin on a live state, so start from a clean one
        AcceleratorState._reset_state(reset_partial_state=True)
        on_gpu = torch.cuda.is_available()
        config = {
            **config,
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": grad_clip or 0.0,
        }
        if not on_gpu:  # no mixed precision on CPU
            config["bf16"], config["fp16"] = {"enabled": False}, {"enabled": False}
        handlers = [] if on_gpu else [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))]
        self.accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
            kwargs_handlers=handlers,
            gradient_accumulation_steps=accumulation,  # as in the DeepSpeed config (else a warning)
        )
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.model = self.optimizer = None

    def prepare(self, model, optimizer):
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, self.optimizer

    def backward(self, loss: torch.Tensor, is_last: bool = True) -> None:
        """DeepSpeed divides by the accumulation steps and steps at the last micro batch: the boundary
        is told explicitly, not left to accelerate's own counting (which the loop does not use)."""
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=is_last)

    def step(self) -> None:
        self.optimizer.step()  # no-ops under DeepSpeed (the step was taken in backward); kept for clarity
        self.optimizer.zero_grad()

    def save(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def load(self, folder: Path, saved_world_size: int | None = None) -> None:
        """Raises when the model states are missing: DeepSpeed would only log a warning and go on
        with the weights it has (a cut-off or missing ZeRO file raises by itself). Written by another
        number of processes: through the universal checkpoint (`to_universal`)."""
        states = folder / DS_TAG
        if not any(states.glob("*model_states.pt")):
            raise FileNotFoundError(f"no DeepSpeed model states in {states}")
        if saved_world_size in (None, self.world_size):
            self.accelerator.load_state(str(folder))
            return
        universal, failed = folder / UNIVERSAL, None
        if self.rank == 0 and not _is_universal(universal / DS_TAG):
            try:
                to_universal(states, universal)
            except Exception as err:  # every rank must reach the barrier before anyone raises
                failed = err
        self.barrier()
        if failed is not None:
            raise failed
        if not _is_universal(universal / DS_TAG):
            raise FileNotFoundError(f"rank 0 could not convert {states} to a universal checkpoint")
        engine = self.model  # accelerate hands back DeepSpeed's engine as the model
        # `checkpoint.load_universal` is read at load time only; set for this load, not for the run
        engine._config.load_universal_checkpoint = True
        try:
            path, _ = engine.load_checkpoint(str(universal), tag=DS_TAG)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed loaded nothing from {universal / DS_TAG}")

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


DS_TAG = "pytorch_model"  # accelerate's checkpoint tag for the first model
UNIVERSAL = "universal"  # `<checkpoint>/universal/pytorch_model/`: DeepSpeed's universal checkpoint


def _is_universal(folder: Path) -> bool:
    return (folder / "zero" / "optimizer_state.pt").is_file() and any(folder.glob("*model_states.pt"))


def to_universal(states: Path, target: Path) -> None:
    """DeepSpeed's `ds_to_universal` (in this process, one worker) from the ZeRO files in `states` to
    `target/pytorch_model/`, written under a temporary name and renamed: a conversion cut off by a
    crash is made again. `--inject_missing_state`: accelerate does not store the universal
    checkpoint info DeepSpeed wants (a version tag)."""
    import argparse
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = target.with_name(f".{target.name}-partial")
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(states),
        output_folder=str(partial / DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints would fill the task log
        ds_to_universal(args)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def _one_process_group_unless_launched() -> None:
    """accelerate's DeepSpeed needs a process group even for one process: without torchrun's
    variables, set the ones `torchrun --nproc_per_node 1` would (a free port on 127.0.0.1)."""
    import os
    import socket

    if "RANK" in os.environ or dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    defaults = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def make_engine(
    deepspeed_config: Path | None,
    micro_batch: int,
    grad_clip: float | None,
    device: str = "cpu",
    accumulation: int = 1,
) -> Engine:
    """DeepSpeed when a config file is given, plain torch otherwise."""
    if deepspeed_config is None:
        return PlainEngine(grad_clip, device, accumulation)
    config = json.loads(Path(deepspeed_config).read_text())
    return DeepSpeedEngine(config, micro_batch, grad_clip, accumulation)
