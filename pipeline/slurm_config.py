"""The manifest's `slurm:` section: resources per stage over a default, validated like the rest.

    slurm:
      default:  {partition: gpu, account: proj, time: "04:00:00", cpus_per_task: 8, mem: 64G,
                 signal_lead: 120, max_requeues: 3, extra: ["--qos=normal"]}
      caption:  {tasks_per_node: 4, gpus_per_node: 4}          # 4 tasks share the shards
      download: {array: 8}                                      # 8 array tasks share the shards
      finetune: {nodes: 2, gpus_per_node: 8}                    # srun + torchrun, 16 processes

A stage section overrides only the keys it sets. `array` is for the data stages only (download,
caption, evaluate); training stages run one torchrun per node with `gpus_per_node` processes (or
`tasks_per_node` without GPUs).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, create_model, field_validator, model_validator

from pipeline.registry import DATA_STAGES, STAGE_ORDER, TRAINING_STAGES

TIME = r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$"  # sbatch --time: minutes, [D-]HH[:MM[:SS]]
MEMORY = r"^\d+[KMGT]?$"


class SlurmResources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = None
    account: str | None = None
    nodes: PositiveInt = 1
    tasks_per_node: PositiveInt = 1
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: PositiveInt | None = None
    mem: str | None = Field(None, pattern=MEMORY)
    time: str | None = Field(None, pattern=TIME)
    array: PositiveInt | None = None  # data stages: this many array tasks share the shards
    signal_lead: PositiveInt = 120  # seconds before the time limit that USR1 arrives
    max_requeues: int = Field(3, ge=0)  # the job requeues itself at most this often
    extra: list[str] = []  # more sbatch options, e.g. "--qos=high"

    @field_validator("extra")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not v.startswith("--") or "\n" in v]
        if bad:
            raise ValueError(f"extra sbatch options must each be one '--option[=value]', got {bad}")
        return value

    @property
    def processes_per_node(self) -> int:
        """torchrun's --nproc_per_node for training stages."""
        return self.gpus_per_node or self.tasks_per_node


class _StageResources(BaseModel):
    """`default` plus one optional key per registered stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    default: SlurmResources = SlurmResources()


_PerStage = create_model(
    "_PerStage", __base__=_StageResources, **{name: (SlurmResources | None, None) for name in STAGE_ORDER}
)


class SlurmSection(_PerStage):
    @model_validator(mode="after")
    def _arrays_for_data_stages(self) -> "SlurmSection":
        for stage in TRAINING_STAGES:
            if self.resources(stage).array is not None:
                raise ValueError(
                    f"{stage}: `array` is for the data stages ({', '.join(DATA_STAGES)}); "
                    "training runs one torchrun per node"
                )
        return self

    def resources(self, stage: str) -> SlurmResources:
        """The default with the stage's own keys on top."""
        own = getattr(self, stage, None)
        if own is None:
            return self.default
        return SlurmResources(**{**self.default.model_dump(), **own.model_dump(exclude_unset=True)})
