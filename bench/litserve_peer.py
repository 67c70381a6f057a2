"""A LitServe server on the weights of one of our model folders: the peer bench/serve_photos.py
measures `python -m serve` against. Bench-only (litserve is in requirements-bench.txt).

    python bench/litserve_peer.py MODEL_DIR --port 8001 [--threads 1] [--max-batch-size 64] [--batch-timeout 0.002]

What it does is what LitServe's documentation shows for an image classifier, configured as well
as we could on this machine, so that the comparison is with LitServe at its best and not with a
straw man:
- `POST /v1/predict`, multipart/form-data with one or more images under the field `files`, the
  same request our API takes; the answer has the same shape, one object per file in order:
  [{"label": ..., "confidences": [{"label": ..., "confidence": ...}, ... top_k]}].
- batching as documented: `LitAPI(max_batch_size=64, batch_timeout=0.002)` (requests that arrive
  within 2 ms share one forward pass), one inference worker (`workers_per_device=1`) on the CPU.
- preprocessing as a LitServe user writes it, from the model's metadata.json: PIL decode,
  EXIF rotation, RGB, bilinear squish to the model's image size, then the same per-channel
  normalisation; the network is the exported learner's own module (`load_model_folder`), in eval
  mode under `torch.inference_mode`.
- `--threads`: torch threads in the inference worker; serve_photos.py tries several and keeps
  the fastest.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

FIELD = "files"  # our API's multipart field


class PeerAPI(ls.LitAPI):
    def __init__(self, model_dir: str, threads: int, top_k: int, **kwargs):
        super().__init__(**kwargs)
        self.model_dir, self.threads, self.top_k = model_dir, threads, top_k

    def setup(self, device):
        torch.set_num_threads(self.threads)
        from models.contract import load_model_folder
        folder = load_model_folder(self.model_dir)
        meta = folder.metadata
        self.classes = list(meta.classes)
        self.size = int(meta.image_size)
        self.mean = torch.tensor(meta.normalize.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(meta.normalize.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.model = folder.learner.model.eval().to(device)
        self.device = device
        self.k = min(self.top_k, len(self.classes))

    def decode_request(self, request):
        # `request` is the form LitServe parsed (starlette FormData): one UploadFile per image.
        uploads = request.getlist(FIELD) if hasattr(request, "getlist") else []
        if not uploads:
            raise HTTPException(400, f"no '{FIELD}' field")
        xs = []
        for up in uploads:
            data = up.file.read() if hasattr(up, "file") else bytes(up)
            try:
                im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            except Exception as e:
                raise HTTPException(422, f"not an image: {e}") from None
            im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
            xs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        return torch.stack(xs)  # uint8 (n, 3, S, S), n = images in this request

    def batch(self, inputs):
        # Requests carry different numbers of images: one forward pass over all of them.
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, batch):
        x, counts = batch
        with torch.inference_mode():
            x = (x.to(self.device).float().div_(255) - self.mean) / self.std
            probs = self.model(x).softmax(1)
        conf, idx = probs.topk(self.k, dim=1)
        return conf.tolist(), idx.tolist(), counts

    def unbatch(self, output):
        conf, idx, counts = output
        out, start = [], 0
        for n in counts:
            out.append((conf[start:start + n], idx[start:start + n]))
            start += n
        return out

    def encode_response(self, output):
        conf, idx = output
        return [{"label": self.classes[i[0]],
                 "confidences": [{"label": self.classes[j], "confidence": c} for j, c in zip(i, cs)]}
                for cs, i in zip(conf, idx)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model folder written by `python -m train`")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the inference worker (default 1)")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per batch (default 64)")
    p.add_argument("--batch-timeout", type=float, default=0.002, help="seconds to wait for a batch to fill (default 0.002)")
    p.add_argument("--top-k", type=int, default=3)
    args = p.parse_args()
    api = PeerAPI(args.model, args.threads, args.top_k, max_batch_size=args.max_batch_size,
                  batch_timeout=args.batch_timeout, api_path="/v1/predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    print(json.dumps({"litserve": ls.__version__, "threads": args.threads, "max_batch_size": args.max_batch_size,
                      "batch_timeout": args.batch_timeout}), flush=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
