"""The poll benchmark's baseline: a hello-world GET, served like the API (uvloop, httptools)."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, bool]:
    return {"ok": True}
