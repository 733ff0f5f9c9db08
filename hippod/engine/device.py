"""Which device MLX computes on here, as JSON on stdout: `python -m hippod.engine.device`.

The daemon never imports MLX, so it asks this short subprocess (or a loaded runner) instead.
"""

from __future__ import annotations

import json


def describe() -> dict:
    import mlx.core as mx

    device = mx.default_device()
    info = {"device": str(device.type).rsplit(".", 1)[-1], "mlx_version": mx.__version__,
            "metal": bool(mx.metal.is_available())}
    cuda = getattr(mx, "cuda", None)
    info["cuda"] = bool(cuda is not None and cuda.is_available())
    return info


if __name__ == "__main__":
    print(json.dumps(describe()))
