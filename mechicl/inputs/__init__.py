"""The inputs layer: what the analyses feed a model. ICL tasks and their k-shot prompts
(:mod:`~mechicl.inputs.tasks`, built-in offline data under ``inputs/data/tasks``) and
clean / corrupted prompt pairs for patching (:mod:`~mechicl.inputs.pairs`)."""

from mechicl.inputs import variants  # registers the derived tasks (issue 23)
from mechicl.inputs.pairs import PAIR_GENERATORS, PromptPairs, make_pairs, register_pairs
from mechicl.inputs.tasks import (
    BUILTIN_TASKS,
    TASKS,
    Example,
    Prompt,
    Task,
    TaskFileError,
    build_prompts,
    load_task,
    register_task,
    task_from_file,
    tasks_registered,
)

__all__ = [
    "BUILTIN_TASKS",
    "PAIR_GENERATORS",
    "TASKS",
    "Example",
    "Prompt",
    "PromptPairs",
    "Task",
    "TaskFileError",
    "build_prompts",
    "load_task",
    "make_pairs",
    "register_pairs",
    "register_task",
    "task_from_file",
    "tasks_registered",
    "variants",
]
