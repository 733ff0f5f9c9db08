"""Quantize a float MLX model directory to MLX affine weights (Ollama's `create --quantize`).

Runs as a subprocess of the daemon, like the GGUF converter, so MLX's memory is given back when
it ends. mlx_lm's own convert does the work; this adds the checks and a one-line JSON result.

CLI: ``python -m hippod.engine.quantize SRC DST BITS GROUP_SIZE``; exit 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hippod import lifeline


class QuantizeError(ValueError):
    """The model cannot be quantized; the CLI reports it in one line with exit code 2."""


def quantize_dir(src: Path, dst: Path, bits: int, group_size: int) -> dict:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise QuantizeError(f"{src}: no config.json")
    config = json.loads(config_path.read_text())
    if config.get("quantization") or config.get("quantization_config"):
        quant = config.get("quantization") or config.get("quantization_config")
        raise QuantizeError(
            f"the model is already quantized ({config.get('gguf_quantization') or quant}); "
            "quantize needs a float (F32/F16/BF16) model")
    if dst.exists():
        raise QuantizeError(f"{dst}: destination exists")
    from mlx_lm.convert import convert

    convert(str(src), str(dst), quantize=True, q_bits=bits, q_group_size=group_size)
    out_config = json.loads((dst / "config.json").read_text())
    out_config.pop("gguf_quantization", None)  # the weights are no longer the GGUF's
    (dst / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    return {"bits": bits, "group_size": group_size}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print("usage: python -m hippod.engine.quantize SRC DST BITS GROUP_SIZE", file=sys.stderr)
        return 2
    src, dst, bits, group = Path(args[0]), Path(args[1]), int(args[2]), int(args[3])
    return lifeline.reply("quantize", lambda: quantize_dir(src, dst, bits, group),
                          (QuantizeError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
