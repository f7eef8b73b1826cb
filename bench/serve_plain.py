"""The baseline a user would write: one uvicorn process, FastAPI, the same MLflow model, the same
request and response shape as deepyard's endpoint. Used by bench/serve_latency.py.

    MODEL_URI=models:/digits-cnn/1 uvicorn bench.serve_plain:app --port 8001
"""

import os

import mlflow.pytorch
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

torch.set_num_threads(1)
model = mlflow.pytorch.load_model(os.environ["MODEL_URI"], map_location="cpu")
names = [str(i) for i in range(10)]
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    batch = np.asarray(body["instances"], dtype=np.float32).reshape(-1, 1, 8, 8)
    with torch.inference_mode():
        probabilities = model(torch.from_numpy(batch)).numpy()
    predictions = [{"label": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p)))}
                   for p in probabilities]
    return JSONResponse({"predictions": predictions, "model": "digits-cnn", "version": "1"})
