"""Tasks, the unit of change: one file per task, each registered by name (``mmfm.tasks.base``).

    mmfm.tasks.list_tasks()   # ['image_text', 'video_text', 'vqa', 'video_qa', 'segmentation', 'tokenizer']

Adding a task is one new file with a ``@register_task`` class (docs/architecture.md).
"""

from mmfm.tasks import align, answer, segmentation, tokenizer  # noqa: F401  (register the built-in tasks)
from mmfm.tasks.base import (
    Task,
    TaskLoss,
    answer_heads_by_modality,
    answer_task_of,
    get_task,
    list_tasks,
    register_task,
    unregister_task,
)

__all__ = ["Task", "TaskLoss", "answer_heads_by_modality", "answer_task_of", "get_task", "list_tasks",
           "register_task", "unregister_task"]
