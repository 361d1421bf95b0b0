"""Run by the elastic test under torchrun: the optimizer state of DeepSpeed ZeRO-2, saved by N processes
and loaded by M, read back whole with DeepSpeed's own `safe_get_full_*` helpers.

    torchrun --nproc_per_node 2 tests/helpers/elastic_check.py save FOLDER DS_CONFIG OUT.pt
    torchrun --nproc_per_node 3 tests/helpers/elastic_check.py load FOLDER DS_CONFIG OUT.pt 2

`save` trains 3 AdamW steps (each rank its own data) and saves FOLDER; `load` loads FOLDER, written by
the given number of processes, through `DeepSpeedEngine.load`. Both write (rank 0) OUT.pt: per
parameter its fp32 value, exp_avg and exp_avg_sq, and the optimizer's step count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.training.engine import make_engine  # noqa: E402


def _full_state(model) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in model.module.named_parameters():  # collectives: every rank calls them
        state[name] = {
            "fp32": safe_get_full_fp32_param(param).clone(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").clone(),
        }
    return state


def main() -> None:
    mode, folder, ds_config, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.manual_seed(0)  # the same initial weights on every rank
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))  # 66 values
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    engine = make_engine(ds_config, micro_batch=4, grad_clip=1.0)
    model, optimizer = engine.prepare(module, optimizer)
    if mode == "save":
        generator = torch.Generator().manual_seed(engine.rank)
        for _ in range(3):
            x, y = torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator)
            engine.backward(torch.nn.functional.mse_loss(model(x), y))
            engine.step()
        engine.save(folder)
        engine.barrier()
    else:
        engine.load(folder, int(sys.argv[5]))
    state = _full_state(model)
    steps = {int(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s}
    if engine.rank == 0:
        torch.save({"params": state, "steps": sorted(steps), "world_size": engine.world_size}, out)


if __name__ == "__main__":
    main()
