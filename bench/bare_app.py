"""The baseline: a bare FastAPI `async def` GET /predict that returns the same JSON as the service.

Run under uvicorn with the settings `python -m service` uses (service/server.py), so the
only difference measured is what the service does per request.

    python bench/bare_app.py PORT W B VERSION
"""

import logging
import sys

import uvicorn
from fastapi import FastAPI


def create_bare_app(w: float, b: float, version: int) -> FastAPI:
    app = FastAPI()

    @app.get("/predict")
    async def predict(hours: float) -> dict[str, float | int]:
        return {"hours": hours, "score": w * hours + b, "model_version": version}

    return app


def main() -> None:
    port, w, b, version = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(
        create_bare_app(w, b, version),
        host="127.0.0.1",
        port=port,
        log_level="info",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
