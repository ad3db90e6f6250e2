"""A task type of your own: run it with TASKDOCK_TASK_MODULES=myproject.tasks make run."""

from pydantic import BaseModel

from app.tasks.registry import RetryPolicy, TaskContext, task_type


class ResizeInput(BaseModel):
    image_id: int
    width: int


class ResizeOutput(BaseModel):
    url: str


@task_type(
    "resize_image",
    input=ResizeInput,
    output=ResizeOutput,
    queue="images",
    retry=RetryPolicy(max_retries=5, backoff=2, retry_on=(ConnectionError,)),
    time_limit=120,
)
def resize_image(payload: ResizeInput, ctx: TaskContext) -> ResizeOutput:
    """Resize an image; safe to run twice (it overwrites the same key)."""
    # ... fetch, resize and store the image under a key made of its id and width ...
    return ResizeOutput(url=f"https://cdn.example/{payload.image_id}-{payload.width}.png")
