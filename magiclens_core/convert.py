"""Convert a released MagicLens `.pkl` into the project's model folder, once.

    python -m magiclens_core.convert magic_lens_clip_base.pkl models/magiclens-base/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from magiclens_core.errors import CheckpointError
from magiclens_core.weights.folder import read_config_json, save_model
from magiclens_core.weights.official import load_official_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magiclens_core.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="official magic_lens_clip_{base,large}.pkl")
    parser.add_argument("out_dir", type=Path, help="model folder to write (safetensors + config.json)")
    args = parser.parse_args(argv)
    try:
        model = load_official_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the same weights keep the same id: a table embedded with the .pkl accepts the folder, and back
    save_model(model, args.out_dir, metadata={"converted_from": args.checkpoint.name}, model_id=model.model_id)
    print(json.dumps({"model_id": read_config_json(args.out_dir)["model_id"], "size": model.config.name,
                      "embed_dim": model.embed_dim, "out_dir": str(args.out_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
