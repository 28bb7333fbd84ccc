"""KServe's own Python SDK, its v1 REST client (``InferenceRESTClient`` with ``RESTConfig(protocol="v1")``), against
a zfserve server's ``/v1`` routes, in a process of its own (tests/test_oip_explain.py; kserve cannot share a process
with tritonclient.grpc).

    python tests/_kserve_v1.py http://HOST:PORT MODEL IMAGES.npy WINDOW STRIDE IMAGE.jpg [IMAGE.jpg ...]

prints JSON: {"ready", "absent_ready_error", "predict_b64", "predict_lists", "explain"}.
"""

import asyncio
import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from kserve import InferenceRESTClient, RESTConfig


async def main(base: str, model: str, tensor_file: str, window: int, stride: int, image_files: list[str]) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=300))
    try:
        answer = {"ready": await client.is_model_ready(base, model)}
        try:
            await client.is_model_ready(base, "absent")
        except httpx.HTTPStatusError as exc:
            answer["absent_ready_error"] = exc.response.status_code
        encoded = [{"b64": base64.b64encode(Path(f).read_bytes()).decode()} for f in image_files]
        answer["predict_b64"] = (await client.infer(base, {"instances": encoded}, model_name=model))["predictions"]
        lists = np.load(tensor_file).tolist()
        answer["predict_lists"] = (await client.infer(base, {"instances": lists}, model_name=model))["predictions"]
        answer["explain"] = await client.explain(base, model, {"instances": encoded,
                                                               "parameters": {"window": window, "stride": stride}})
        return answer
    finally:
        await client.close()


if __name__ == "__main__":
    base, model, tensors, window, stride, *images = sys.argv[1:]
    print(json.dumps(asyncio.run(main(base, model, tensors, int(window), int(stride), images))))
