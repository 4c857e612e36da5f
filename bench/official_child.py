"""The official side of bench/bench_official.py: runs in the official checkout's own venv.

Imports the release's ``model/network.py`` from the checkout given on the command line (nothing
of it is copied here), builds ``GeoLocalizationNetRerank`` the way the release's test.sh
configures it, loads the state_dict file the parent wrote and answers one JSON command per stdin
line with one JSON line on stdout, so that the parent can alternate official and own runs:

    {"op": "rerank", "q": npy, "c": npy, "out": npy|null}  -> {"seconds": s}
    {"op": "extract", "images": npy, "out": npz|null}      -> {"seconds": s}
    {"op": "quit"}

Adaptations, all outside the official files: the release calls ``.cuda()`` on a small constant
tensor inside the reranker (a no-op here, CPU only), imports packages it never uses on this path
(transformers, google_drive_downloader, cv2, faiss, matplotlib, scipy: stubbed when absent), and
its DeiT builder downloads ImageNet weights by default (built with ``pretrained=False``; every
weight is overwritten by the state_dict anyway).

    <official venv>/bin/python bench/official_child.py CHECKOUT STATE_DICT THREADS
"""
from __future__ import annotations

import importlib
import json
import sys
import time
import types
from argparse import Namespace
from functools import partial

STUBS = ("transformers", "google_drive_downloader", "cv2", "faiss", "matplotlib", "matplotlib.pyplot",
         "scipy", "scipy.ndimage")


class _Anything(types.ModuleType):
    """Stand-in for a package the official code imports but never calls on the measured path."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _stub_missing() -> list[str]:
    stubbed = []
    for name in STUBS:
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules[name] = _Anything(name)
            stubbed.append(name)
    return stubbed


def build(checkout: str, state_dict_path: str):
    import torch
    sys.path.insert(0, checkout)
    stubbed = _stub_missing()
    torch.Tensor.cuda = lambda self, *a, **k: self          # CPU run: the release's .cuda() is a no-op
    import model.Deit as deit
    import model.network as network
    network.deit_small_distilled_patch16_224 = partial(deit.deit_small_distilled_patch16_224, pretrained=False)
    args = Namespace(backbone="deit", resize=[480, 640], fc_output_dim=256, rerank_model="r2former",
                     num_local=500, local_dim=128, hypercolumn=0, finetune=False)
    net = network.GeoLocalizationNetRerank(args)
    sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    net.load_state_dict(sd, strict=True)
    return net.float().eval(), stubbed


def main() -> None:
    checkout, sd_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import numpy as np
    import timm
    import torch
    torch.set_num_threads(threads)
    net, stubbed = build(checkout, sd_path)
    print(json.dumps({"ready": True, "torch": torch.__version__, "timm": timm.__version__,
                      "threads": torch.get_num_threads(), "stubbed": stubbed}), flush=True)
    cache: dict[str, torch.Tensor] = {}

    def load(path):
        if path not in cache:
            cache[path] = torch.from_numpy(np.load(path))
        return cache[path]

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        with torch.no_grad():
            if cmd["op"] == "rerank":
                q, c = load(cmd["q"]), load(cmd["c"])
                g = torch.ones(q.shape[0], 256) / 16.0         # globals only enter final_score
                t = time.perf_counter()
                logits, _ = net.Reranker(g, q, g, c)
                sec = time.perf_counter() - t
                if cmd.get("out"):
                    np.save(cmd["out"], logits.numpy())
            elif cmd["op"] == "extract":
                x = load(cmd["images"])
                t = time.perf_counter()
                glob, local = net(x)
                sec = time.perf_counter() - t
                if cmd.get("out"):
                    np.savez(cmd["out"], global_desc=glob.numpy(), local_features=local.numpy())
            else:
                raise ValueError(f"unknown op {cmd['op']!r}")
        print(json.dumps({"seconds": sec}), flush=True)


if __name__ == "__main__":
    main()
