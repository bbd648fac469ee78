"""Convert an official bytedance/MVDream checkpoint into our diffusers-native model folders.

    python jobs/convert_official.py --ckpt sd-v2.1-base-4view.pt \
        --config sd-v2-base.yaml --out checkpoints/mvdream-sd21

Writes OUT/unet (MultiViewUNet), OUT/vae (AutoencoderKL, when the checkpoint has one) and
OUT/conversion.json, atomically. With --text-encoder SD_FOLDER (the SD version the checkpoint
was fine-tuned from) and a VAE in the checkpoint, OUT is a complete MVDreamPipeline folder
that `jobs/generate.py model=mvdream_official model.path=OUT` loads. Bad input exits with
status 2 and a one-line error.
"""

from __future__ import annotations

import _starting  # noqa: F401  (its first line, before the heavy imports below)

# isort: split
import argparse
import logging
import sys

import torch

from mvdream_platform.models.convert_official import ConversionError
from mvdream_platform.pipelines.convert_official import convert_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="official checkpoint (.pt/.ckpt/.safetensors)")
    parser.add_argument("--config", required=True, help="official YAML config (sd-v2-base.yaml)")
    parser.add_argument("--out", required=True, help="output folder (local path or fsspec URI)")
    parser.add_argument("--text-encoder", default=None,
                        help="SD folder/URI with text_encoder/ + tokenizer/: write a full pipeline")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the written weights (default: float32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert_checkpoint(args.ckpt, args.config, args.out, overwrite=args.overwrite,
                                    dtype=DTYPES[args.dtype], text_encoder_path=args.text_encoder)
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, always
        return 2
    keys = result.record["keys"]
    print(f"converted {keys['unet']} UNet + {keys['vae']} VAE tensors "
          f"({result.record['unet']['parameters'] / 1e6:.1f}M UNet parameters) -> {result.out_dir} "
          f"[{result.record['layout']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
