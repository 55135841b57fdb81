"""Q2_K for llama.cpp: our exported weights against ggml's own Q2_K rounding, and llama.cpp's speed.

Needs llama-cpp-python, which ships llama.cpp's libraries: ggml's Q2_K quantizer is called through
ctypes (``ggml_quantize_chunk``, the function llama-quantize uses), and ``llama_cpp.Llama`` runs the
files.

1. Quality, on the quickstart model and data (SmolLM2-135M-Instruct, held-out pydoc text, 256-token
   blocks, the quickstart's 15,360 held-out tokens): held-out perplexity of
   - the float model;
   - ggml's Q2_K rounding of the float weights of the layers the quickstart quantizes, without and
     with an importance matrix (sums of squared layer inputs over the quickstart's training blocks,
     as llama-imatrix collects them);
   - the quickstart's stage A checkpoint, with the weights Q2_K stores for it (``q2k_blocks``, read
     back by gguf's Q2_K dequantizer).
   SmolLM2's hidden size is 576, so most rows are not whole 256-weight Q2_K blocks. ggml gets each
   row zero-padded to a multiple of 256 and the padding is dropped afterwards. A 16-weight sub-block
   of zeros gets scale and min 0 and leaves the block's d and dmin unchanged, so without an
   importance matrix the real weights come out as a 64-weight block would give them. With one, ggml
   also weights errors by the mean square of the block, which the padding lowers. llama-quantize
   itself does not write these rows as Q2_K. The llama.cpp in llama-cpp-python 0.3.36 falls back to
   Q4_0 for rows that are not whole blocks.
2. Speed, on a random Qwen3 model of bench/stage_b_memory.py's "small" shape, whose rows are whole
   blocks: llama.cpp generation tokens/s and file size of several files. Our Q2_K export runs with
   the embedding in F16 or Q8_0, and with a GGUF LoRA adapter. ``llama_model_quantize`` converts it
   to F16, and llama.cpp's own Q2_K preset, which picks a type per tensor, is made from that F16 file.

    python bench/gguf_q2k.py                                   # about 10 minutes on a 2-core CPU
    python bench/gguf_q2k.py --skip speed --checkpoint outputs/quickstart/qat
"""

import argparse
import ctypes
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stage_b_memory

logger = logging.getLogger("bench.gguf_q2k")
QK_K = 256


def ggml_library() -> ctypes.CDLL:
    """Load ggml's base library from the llama-cpp-python install, with ``ggml_quantize_chunk`` typed."""
    try:
        import llama_cpp
    except ImportError as error:
        raise SystemExit(
            "bench/gguf_q2k.py needs llama-cpp-python for ggml's Q2_K quantizer and for running the files; "
            "install it with: pip install llama-cpp-python"
        ) from error
    candidates = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not candidates:
        raise SystemExit(f"no libggml-base library under {Path(llama_cpp.__file__).parent / 'lib'}")
    library = ctypes.CDLL(str(candidates[0]))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return library


def pad_columns(matrix: np.ndarray, multiple: int = QK_K) -> np.ndarray:
    """Return ``matrix`` (rows, cols) with zero columns appended up to a multiple of ``multiple``."""
    missing = -matrix.shape[1] % multiple
    return np.pad(matrix, ((0, 0), (0, missing))) if missing else matrix


def ggml_q2k_round_trip(library: ctypes.CDLL, weight: torch.Tensor, importance=None) -> torch.Tensor:
    """Quantize ``weight`` (out, in) with ggml's Q2_K quantizer and dequantize it with gguf's reader.

    Rows are zero-padded to whole 256-weight blocks for ggml, and the padding is dropped again.
    ``importance`` (in,), if given, is the importance matrix row ggml weights the rounding error with.
    """
    import gguf

    rows, cols = weight.shape
    source = np.ascontiguousarray(pad_columns(weight.detach().float().cpu().numpy()), dtype=np.float32)
    padded_cols = source.shape[1]
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K][1]
    blocks = np.zeros((rows, padded_cols // QK_K * block_bytes), dtype=np.uint8)
    weights = None
    if importance is not None:
        weights = np.ascontiguousarray(pad_columns(np.asarray(importance, dtype=np.float32).reshape(1, -1)))
    written = library.ggml_quantize_chunk(
        int(gguf.GGMLQuantizationType.Q2_K), source.ctypes.data, blocks.ctypes.data, 0, rows, padded_cols,
        None if weights is None else weights.ctypes.data,
    )
    if written != blocks.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {blocks.nbytes}")
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q2_K)
    return torch.from_numpy(np.ascontiguousarray(values[:, :cols])).to(weight.dtype)


def our_q2k_weight(layer) -> torch.Tensor:
    """Return the weight Q2_K stores for a per-tensor or per-channel ``QATLinear``, as gguf decodes it.

    The codes are zero-padded to whole blocks as in ``ggml_q2k_round_trip``; the padding is dropped.
    """
    import gguf

    from peft_qat2bit.gguf_export import q2k_blocks

    quantizer = layer.weight_fake_quantizer
    if quantizer.f.shape[1] != 1:
        raise ValueError(f"{quantizer.module_name}: per-group scales do not fit one Q2_K d per block here")
    with torch.no_grad():
        codes = quantizer.codes(layer.weight).reshape(layer.weight.shape)
        scale = quantizer.scale(layer.weight).reshape(-1)
    cols = codes.shape[1]
    # Padding codes of 0 decode to -s/2; they are dropped below, so their value does not matter.
    blocks = q2k_blocks(pad_columns(codes.to(torch.int8).numpy()), scale)
    values = gguf.quants.dequantize(blocks.reshape(codes.shape[0], -1), gguf.GGMLQuantizationType.Q2_K)
    return torch.from_numpy(np.ascontiguousarray(values[:, :cols])).to(layer.weight.dtype)


def importance_matrix(model: torch.nn.Module, names: list[str], blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the mean squared input per column of each named linear over ``blocks``, as llama-imatrix does."""
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(modules[name].in_features, dtype=torch.float64) for name in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).double()
            sums[name] += x.pow(2).sum(dim=0)
            counts[name] += x.shape[0]
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for block in blocks:
                model(input_ids=block.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float() for name in names}


def measure_quality(args: argparse.Namespace, library: ctypes.CDLL) -> dict:
    """Part 1: held-out perplexity of the float model, ggml's Q2_K rounding and our stage A checkpoint."""
    from peft_qat2bit import load_qat_model, qat_linears
    from peft_qat2bit.data import pydoc_topics_text
    from peft_qat2bit.evaluation import perplexity, token_blocks
    from peft_qat2bit.hub import EMBEDDED_MODEL, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL, dtype=torch.float32)
    train, held_out = pydoc_topics_text()
    held_out_blocks = token_blocks(tokenizer, held_out["text"], args.block_length, max_tokens=args.eval_tokens)
    train_blocks = token_blocks(tokenizer, train["text"], args.block_length, max_tokens=args.imatrix_tokens)
    qat_model = load_qat_model(args.checkpoint, dtype=torch.float32)
    names = list(qat_linears(qat_model))  # the layers the quickstart quantized
    logger.info("held-out blocks %s; %d quantized linears", tuple(held_out_blocks.shape), len(names))

    results = {"held_out_tokens": held_out_blocks.numel(), "imatrix_tokens": train_blocks.numel(),
               "linears": len(names), "perplexity": {}}
    perplexities = results["perplexity"]
    perplexities["float"] = perplexity(model, held_out_blocks)
    logger.info("float: %.2f", perplexities["float"])

    float_weights = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    importance = importance_matrix(model, names, train_blocks)
    for label, use_importance in (("ggml Q2_K rounding", False), ("ggml Q2_K rounding, importance matrix", True)):
        with torch.no_grad():
            for name in names:
                rounded = ggml_q2k_round_trip(library, float_weights[name], importance[name] if use_importance else None)
                model.get_submodule(name).weight.copy_(rounded)
        perplexities[label] = perplexity(model, held_out_blocks)
        logger.info("%s: %.2f", label, perplexities[label])
    del model

    perplexities["ours, stage A, fake-quantized"] = perplexity(qat_model, held_out_blocks)
    largest = 0.0
    with torch.no_grad():
        for layer in qat_linears(qat_model).values():
            stored = our_q2k_weight(layer)
            largest = max(largest, (stored - layer.weight_fake_quantizer(layer.weight)).abs().max().item())
            layer.weight.copy_(stored)
            layer.weight_fake_quantizer.enabled = False
    perplexities["ours, stage A, as Q2_K stores it"] = perplexity(qat_model, held_out_blocks)
    results["ours_max_abs_difference_to_fake_quant"] = largest
    logger.info("ours: %s", {key: value for key, value in perplexities.items() if key.startswith("ours")})
    return results


def tokens_per_second(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int,
                      adapter: Path | None = None) -> dict:
    """Greedy-generate ``new_tokens`` after ``prompt`` with llama.cpp ``repeats`` times; tokens/s after the first token."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(adapter) if adapter else None,
                          n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
    rates = []
    try:
        for repeat in range(repeats + 1):
            first = None
            for produced, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
                if produced == 1:
                    first = time.perf_counter()
                if produced == new_tokens:
                    break
            if repeat:  # the first run warms up
                rates.append((new_tokens - 1) / (time.perf_counter() - first))
    finally:
        llm.close()
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def llama_quantize(source: Path, target: Path, ftype: int, threads: int) -> None:
    """Run llama.cpp's ``llama_model_quantize`` (llama-quantize) from ``source`` to ``target`` with ``ftype``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise RuntimeError(f"llama_model_quantize({source} -> {target}, ftype={ftype}) failed with status {status}")


def tensor_types(path: Path) -> str:
    """Return how many 2-D tensors of each ggml type a GGUF file has, as "Q2_K x56, F16 x1"."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items(), key=lambda item: -item[1]))


def measure_speed(args: argparse.Namespace) -> dict:
    """Part 2: llama.cpp tokens/s and file size of our Q2_K exports, F16 and llama.cpp's Q2_K preset."""
    import llama_cpp
    from peft import get_peft_model
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM, Qwen3Config

    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig, QATLoraConfig
    from peft_qat2bit.gguf_export import export_gguf
    from peft_qat2bit.gguf_lora import export_gguf_lora
    from peft_qat2bit.hub import EMBEDDED_MODEL, load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL, dtype=torch.float32)
    torch.manual_seed(0)
    config = Qwen3Config(tie_word_embeddings=True, **{**stage_b_memory.SIZES[args.size], "vocab_size": len(tokenizer)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantize_(model, QAT2BitConfig(weight_config=Balanced2BitFakeQuantizeConfig("per_channel")))
    prompt = tokenizer("The quick brown fox jumps over the lazy dog because", add_special_tokens=False)["input_ids"]

    results = {"size": args.size, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "files": {}}
    with tempfile.TemporaryDirectory(prefix="gguf_q2k.") as directory:
        folder = Path(directory)
        files = {
            "ours, Q2_K, F16 embedding": (folder / "ours-q2k.gguf", None),
            "ours, Q2_K, Q8_0 embedding": (folder / "ours-q2k-q8.gguf", None),
            "ours, Q2_K, F16 embedding, + LoRA r=16": (folder / "ours-q2k.gguf", folder / "adapter.gguf"),
            "same weights, F16": (folder / "f16.gguf", None),
            "llama.cpp Q2_K preset from F16": (folder / "llamacpp-q2k.gguf", None),
        }
        export_gguf(model, folder / "ours-q2k.gguf", tokenizer=tokenizer, float_type="f16")
        export_gguf(model, folder / "ours-q2k-q8.gguf", tokenizer=tokenizer, float_type="q8_0")
        llama_quantize(folder / "ours-q2k.gguf", folder / "f16.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_F16, args.threads)
        llama_quantize(folder / "f16.gguf", folder / "llamacpp-q2k.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K, args.threads)
        # The adapter's B matrices start at zero in PEFT; random ones make llama.cpp compute the full LoRA path.
        peft_model = get_peft_model(model, QATLoraConfig(r=16, lora_alpha=16))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.01)
        export_gguf_lora(peft_model, folder / "adapter.gguf")

        for label, (path, adapter) in files.items():
            rate = tokens_per_second(path, prompt, args.new_tokens, args.repeats, args.threads, adapter)
            size = path.stat().st_size + (adapter.stat().st_size if adapter else 0)
            results["files"][label] = {"bytes": size, "tensor_types": tensor_types(path), "tokens_per_s": rate}
            logger.info("%s: %s B, %.1f tokens/s", label, f"{size:,}", rate["median"])
    return results


def print_tables(args: argparse.Namespace, results: dict) -> None:
    quality = results.get("quality")
    if quality:
        print(f"\nHeld-out perplexity, {quality['held_out_tokens']} tokens, quickstart model and data; "
              f"importance matrix from {quality['imatrix_tokens']} training tokens; {quality['linears']} linears")
        print("| weights of the quantized linears | perplexity |")
        print("|---|---|")
        for label, value in quality["perplexity"].items():
            print(f"| {label} | {value:.2f} |")
        print(f"\nlargest |Q2_K-stored weight - our fake-quantized weight|: "
              f"{quality['ours_max_abs_difference_to_fake_quant']:.3g}")
    speed = results.get("speed")
    if speed:
        print(f"\nllama.cpp (llama-cpp-python), random Qwen3 '{speed['size']}' shape, {speed['prompt_tokens']}-token "
              f"prompt, {speed['new_tokens']} greedy tokens, {args.threads} threads, median of {args.repeats} runs")
        print("| file | 2-D tensor types | size | tokens/s, median (min-max) |")
        print("|---|---|---|---|")
        for label, entry in speed["files"].items():
            rate = entry["tokens_per_s"]
            print(f"| {label} | {entry['tensor_types']} | {entry['bytes'] / 2**20:.1f} MiB | "
                  f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f}) |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="outputs/quickstart/qat",
                        help="stage A checkpoint of the quickstart model (default: outputs/quickstart/qat)")
    parser.add_argument("--block-length", type=int, default=256, help="tokens per block, as the quickstart (default: 256)")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="held-out tokens at most, as the quickstart (default: 16384)")
    parser.add_argument("--imatrix-tokens", type=int, default=8192,
                        help="training tokens for the importance matrix (default: 8192)")
    parser.add_argument("--size", choices=tuple(stage_b_memory.SIZES), default="small",
                        help="model shape of the speed part (default: small)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per file (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default: 2)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("quality", "speed"), help="parts to leave out")
    parser.add_argument("--output", default="outputs/bench/gguf_q2k.json", help="results JSON; parts left out with --skip keep their earlier results in it")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    library = ggml_library()
    if "quality" not in args.skip and not Path(args.checkpoint).is_dir():
        raise SystemExit(
            f"--checkpoint {args.checkpoint} is not a directory; run `python examples/quickstart.py` first "
            f"(it writes outputs/quickstart/qat) or pass --skip quality"
        )
    # Parts left out with --skip keep their results from an earlier run in the same output file.
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    if "quality" not in args.skip:
        results["quality"] = measure_quality(args, library)
    if "speed" not in args.skip:
        results["speed"] = measure_speed(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print_tables(args, results)
    return results


if __name__ == "__main__":
    main()
