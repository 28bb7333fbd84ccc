"""KServe's own gRPC client against a zfserve server, in a process of its own (tests/test_interop.py): it cannot
share a process with tritonclient.grpc.

    python tests/_kserve_infer.py HOST:PORT IMAGES.npy IMAGE.jpg [IMAGE.jpg ...]

prints JSON: {"ready": [server ready, model ready], "tiny": probabilities, "tiny-bytes": probabilities}.
"""

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(target: str, tensor_file: str, image_files: list[str]) -> dict:
    client = InferenceGRPCClient(target, timeout=60)
    try:
        ready = [await client.is_server_ready(), await client.is_model_ready("tiny-bytes")]
        x = np.load(tensor_file)
        tensor = InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        images = np.array([Path(f).read_bytes() for f in image_files], dtype=np.object_).reshape(-1, 1)
        encoded = InferInput("image_bytes", list(images.shape), "BYTES")
        encoded.set_data_from_numpy(images, binary_data=True)
        answer = {"ready": ready}
        for model, inp in (("tiny", tensor), ("tiny-bytes", encoded)):
            response = await client.infer(InferRequest(model, [inp], request_id=f"kserve-{model}"))
            (output,) = response.outputs
            assert output.name == "probabilities" and response.id == f"kserve-{model}"
            answer[model] = output.as_numpy().tolist()
        return answer
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))))
