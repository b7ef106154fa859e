"""Config fields that carry their own help text, the single source of `fastllm COMMAND --help`.

A config dataclass (TrainConfig, RLConfig, CleanConfig, ...) declares each field with `option`, a
`dataclasses.field` whose metadata holds a one-line description (with the unit, and what a None or 0 default
means); `fastllm.cli` turns every field into a `--flag` with that help, so the API and the CLI never drift.

>>> @dataclass
... class Config:
...     steps: int = option(100, "optimizer steps")
...     lr: float = option(1e-3, "peak learning rate")
>>> dataclasses.fields(Config)[0].metadata["help"]
'optimizer steps'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# help lines that mean the same in every config
THREADS = "CPU threads for the native kernels (default: OMP_NUM_THREADS, else all cores)"
SEED = "random seed (initialisation, data order, sampling): the same seed gives the same run"
RESUME = "continue from the newest checkpoint in --out (the run continues as if never stopped)"
CKPT_EVERY = "steps between checkpoints (one is always written at the end; 0: only that one)"
KEEP_CKPTS = "how many of the newest checkpoints to keep on disk"
ZERO = "with several ranks (mpiexec): ZeRO-1, each rank keeps 1/N of the AdamW state"
GRAD_CLIP = "clip the global gradient norm to this value (0: no clipping)"
SYSTEM = ("a system message before each prompt in chat prompts (in plain text: its text and a blank line before the "
          "prompt), as lm-eval's --system_instruction (default: none; a chat template may add its own)")
DEVICE = "where to train: cpu, or cuda (a CUDA build of fastllm and an NVIDIA GPU)"
DTYPE = ("compute dtype (default: float32 on the CPU, bfloat16 on a GPU); master weights, gradients and AdamW state "
         "stay float32. CPU bfloat16: the matmuls round their operands to bf16 (fp32 sums; AVX-512 BF16 where the CPU "
         "has it), like torch.autocast; GPU bfloat16: weights and activations in bf16")
# the --eval-task options of `fastllm train`, `sft` and `rl` (fastllm.eval.TrainEval)
EVAL_TASK = ("a task evaluated every --eval-every steps (also at the start and the end), logged as TASK/METRIC "
             "(mc/acc, mc/acc_norm, bpb/bpb, gen/exact_match, ...) and drawn on the run's figure: mc, bpb, gen, "
             "addition or sort, as in `fastllm eval --task` (default: none)")
EVAL_TASK_DATA = ("--eval-task's files (mc: HellaSwag/ARC/MMLU JSONL or CSV; bpb: text, JSONL or token shards; gen: "
                  "problems JSONL), read and checked before the first step (default: none)")
EVAL_TASK_LIMIT = "--eval-task on the first N examples only (default: all of them; addition/sort: 200 prompts)"
LORA_R = ("train LoRA adapters of this rank on the --lora-targets projections and freeze the model (fastllm.lora: no "
          "gradient or AdamW state for its weights; checkpoints hold the adapters, in PEFT's format); 0: train every "
          "weight")
BASE_FORMS = ("bfloat16", "int8")  # the forms a LoRA run's frozen base may be held in (--base-weights)
BASE_WEIGHTS = ("with --lora-r: hold the frozen base's matrices in this form alone, bfloat16 (half the memory of "
                "float32) or int8 (a quarter: per-channel weight-only quantization), as peft on a bf16 or 8-bit base; "
                "CPU (default: float32)")
LORA_ALPHA = "LoRA's scale: the adapters' output is multiplied by alpha / r"
LORA_TARGETS = "the projections LoRA adapts, comma-separated: q, k, v, o, gate, up, down, or all"


def option(default=dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None) -> dataclasses.Field:
    """A dataclass field with a one-line `help` (required) and optional `choices` for the command line.
    Without a default the field (and its --flag) is required."""
    if not help:
        raise ValueError("option() needs a help text")
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


def field_metadata(cls, name: str) -> dict:
    """The help (and choices) of field `name` of dataclass `cls`: its own, else the nearest base class's, so a
    subclass that only changes a default keeps the description."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return dict(f.metadata)
    return {}
