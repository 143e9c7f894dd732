"""spec/ctformat.md as data: dtype codes, tensor names, limits and the rule catalogue.

Nothing else lives here; every constant is defined in the written spec.
"""
from __future__ import annotations

__all__ = [
    "DTYPES", "DTYPE_SIZES", "FLOAT_DTYPES", "FLOAT_NAMES", "HEADER_SIZE_CAP", "QUANT_METHOD", "PACK_QUANTIZED",
    "MIXED_PRECISION", "DENSE_FORMAT", "FORMATS", "SPARSITY_FORMATS", "UNREAD_FORMATS", "FORMAT_PARAMS",
    "ACTIVATION_PARAMS", "QUANT_PARAMS", "KV_PARAMS", "ONLINE_LOCATIONS", "OFFLINE_LOCATIONS", "TRANSFORM_TYPES", "PICKLE_SUFFIXES", "INDEX_NAME", "SINGLE_NAME", "RULES", "CROSS_WORD",
    "PADDED", "CROSS_WORD_SINCE", "EMBEDDING_NAMES", "FUSED_SIBLINGS", "EXPERT_MODULE", "MOE_MODULE", "MOE_PARTS",
    "EXPERT_RENAMES", "MARLIN_LAYOUT", "MARLIN_METHOD", "MARLIN_PARAMS", "MARLIN_TILE", "MARLIN_GROUP_SIZES",
    "LEGACY_MARLIN", "MARLIN_REFUSALS", "DENSE_REFUSALS", "GPTQ_PARAMS", "AWQ_PARAMS", "QUANT_SETS",
    "QUANTIZE_CONFIG_NAME", "GPTQ_RENAMES", "GPTQ_REFUSALS", "GGML_TYPES", "GGUF_MAGIC", "GGUF_VERSIONS", "GGUF_ALIGNMENT",
    "GGUF_VALUE_TYPES", "GGUF_MAX_DIMS", "GGUF_SHARD", "GGUF_REFUSALS",
]

# safetensors dtype code -> (bytes per element, torch dtype name) (spec §1.2). The one dtype table.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"),
}
DTYPE_SIZES: dict[str, int] = {code: size for code, (size, _) in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# dtype names options and configs use (`--dtype`, scale_dtype without its "torch." prefix) -> code
FLOAT_NAMES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

HEADER_SIZE_CAP = 100_000_000          # bytes; the cap the safetensors library enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
MIXED_PRECISION = "mixed-precision"
DENSE_FORMAT = "dense"

# The compressed-tensors formats a config group's `format` may name, and the family that stores
# them (spec/formats.md §1.1). mixed-precision is a top-level summary only; the sparsity formats
# are named by sparsity_config; mxfp6 is not read (CFG-03).
FORMATS: dict[str, str] = {
    "pack-quantized": "pack", "naive-quantized": "naive", "int-quantized": "naive", "float-quantized": "naive",
    "mxfp8-quantized": "mxfp8", "nvfp4-pack-quantized": "nvfp4", "mxfp4-pack-quantized": "mxfp4",
    "dense": "dense", "marlin-24": "marlin-24",
}
SPARSITY_FORMATS: dict[str, str] = {"sparse-bitmask": "sparse-bitmask", "sparse-24-bitmask": "sparse-24"}
UNREAD_FORMATS: dict[str, str] = {
    "mxfp6-pack-quantized": "MXFP6 (compressed-tensors 0.20, three bytes per four values) is not read",
}

# The two word layouts of pack-quantized (spec §3.3). They agree for 1, 2, 4 and 8 bits.
CROSS_WORD = "dense"   # ceil(n*b/32) words, values may straddle words (CT >= 0.18); "dense" in CT's words
PADDED = "padded"      # 32//b values per word, top bits unused (CT 0.5 .. 0.17)
CROSS_WORD_SINCE = (0, 18)

# Tensors of one quantized module besides `weight` and `bias`, by family (spec §2, spec/formats.md
# §3-§6): any of them makes a module quantized.
FORMAT_PARAMS: dict[str, tuple[str, ...]] = {
    "pack": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"),
    "naive": ("weight_scale", "weight_zero_point", "weight_global_scale"),
    "fp4": ("weight_packed", "weight_scale", "weight_global_scale"),
    "sparse": ("compressed", "bitmask", "shape", "row_offsets"),
    "marlin-24": ("weight_packed", "scale_packed", "meta"),
}
# Activation qparams a module stores (spec/formats.md §1.3): not weights, dropped by a dense export.
ACTIVATION_PARAMS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                     "output_global_scale")
QUANT_PARAMS: tuple[str, ...] = tuple(dict.fromkeys(
    [name for names in FORMAT_PARAMS.values() for name in names] + list(ACTIVATION_PARAMS)))
# kv-cache qparams on an attention module (spec/formats.md §9, KV rules).
KV_PARAMS = ("k_scale", "v_scale", "k_zero_point", "v_zero_point")
# Transform locations (spec/formats.md §11): online ones store a rotation tensor, offline ones
# are fused into the stored weights.
ONLINE_LOCATIONS = ("input", "output", "k_cache", "q_attn")
OFFLINE_LOCATIONS = ("weight_input", "weight_output")
TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")

# Module names that hold a 2-D `weight` but are embeddings, not Linear (spec §4.3).
EMBEDDING_NAMES = frozenset({"embed_tokens", "embed_positions", "wte", "wpe", "word_embeddings",
                             "position_embeddings", "tok_embeddings", "embeddings"})

# Sibling projections that inference engines fuse into one matrix (spec §4.4).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)

# A per-expert MoE module: (prefix.experts, expert index, part name) (spec §10.6).
EXPERT_MODULE = r"^(.*\.experts)\.(\d+)\.([^.]+)$"
# An MoE layer's router or per-expert module: (prefix., block, "gate" or experts.N.part) (spec/gptq-awq.md §3.1).
MOE_MODULE = r"^(.*\.)([^.]+)\.(gate|experts\.\d+\.[^.]+)$"
# The projections of one expert, (gate, up, down), in the two naming eras (spec §7.2).
MOE_PARTS: tuple[tuple[str, str, str], ...] = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
# Expert names an architecture's transformers loader reads, where they differ from what
# llm-compressor >= 0.12 writes: model_type -> {on disk: read} (spec §7.2).
EXPERT_RENAMES: dict[str, dict[str, str]] = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}

# The Marlin layout (spec §10).
MARLIN_LAYOUT = "gptq_marlin_repack/vllm-0.33"
MARLIN_METHOD = "ctformat-marlin"        # quant_method of Marlin output outside the legacy subset
MARLIN_PARAMS = ("B", "s", "zp", "g_idx", "perm")
MARLIN_TILE = (16, 64)                   # (K, N) of one tile: 16 input rows x 64 output columns
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
# What every legacy Marlin reader takes (spec §10.7): vLLM <= 0.10.1, AutoGPTQ 0.7, IST-DASLab.
LEGACY_MARLIN = {"num_bits": 4, "group_sizes": (-1, 128), "scale_dtype": "F16", "n_multiple": 256,
                 "k_multiple": 128}
# Refusals of convert --to marlin / --to compressed-tensors (spec §10.9): ID -> statement.
MARLIN_REFUSALS: dict[str, str] = {
    "MCV-01": "quantized modules are 4- or 8-bit",
    "MCV-02": "group size is -1, 32, 64 or 128",
    "MCV-03": "N % 64 == 0, K % 16 == 0, and (N % 64, K % 128) or (N % 128, K % 64) are zero",
    "MCV-04": "zero points only with 4 bits",
    "MCV-05": "--scale-dtype changes no scale's value (unless --allow-lossy-scales)",
    "MCV-06": "--stack-experts: complete expert sets of one scheme and shape, without g_idx",
    "MCV-07": "the input is a pack-quantized checkpoint with one dtype per tensor role",
}

# GPTQ and AWQ (spec/gptq-awq.md): tensors of one quantized Linear, by suffix (§1, §2)
GPTQ_PARAMS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PARAMS = ("qweight", "qzeros", "scales")
# Each checkpoint family's quantization tensor set: a module carrying any of them is quantized
# in a checkpoint of that family (spec §2; spec/gptq-awq.md §1, §2).
QUANT_SETS: dict[str, tuple[str, ...]] = {"compressed-tensors": QUANT_PARAMS, "marlin": MARLIN_PARAMS,
                                          "gptq": GPTQ_PARAMS, "awq": AWQ_PARAMS}
QUANTIZE_CONFIG_NAME = "quantize_config.json"    # GPTQModel reads it before config.json (§4.1)
# MoE module names GPTQModel 7.7 reads under transformers 5, where they differ from the source's
# (spec/gptq-awq.md §3.1): model_type -> {path part on disk: path part written}
GPTQ_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}}
# Refusals of convert --to gptq / --to awq (spec/gptq-awq.md §6): ID -> statement.
GPTQ_REFUSALS: dict[str, str] = {
    "QCV-01": "bits are 2, 3, 4 or 8 for GPTQ, 4 for AWQ",
    "QCV-02": "shapes loaders read: GPTQ K*b and N*b multiples of 32 (3-bit: K, N multiples of 32); AWQ N % 8, K % gs",
    "QCV-03": "every scale survives the cast to float16 (unless --allow-lossy)",
    "QCV-04": "GPTQ v1 holds no zero point 0",
    "QCV-05": "AWQ: no act-order, one scheme, lm_head dense, no dense name inside a quantized one",
    "QCV-06": "no stacked [E, N, K] modules",
    "QCV-07": "the input is pack-quantized weight-only (no activation or kv-cache quantization, no transforms), with one dtype per tensor role, one 3-bit layout and MoE names of one era",
}

# Refusals of convert --to dense (and of run/compare, which read the same dense weights)
# (spec/formats.md §12): ID -> what a dense output needs.
DENSE_REFUSALS: dict[str, str] = {
    "DCV-01": "online rotations fold into a dense weight only at the input or output of a Linear layer, one per side",
}

# GGUF files (spec/gguf.md). ggml type id -> (name, elements per block, bytes per block): ggml.c's
# type_traits (Q8_1 is 36 bytes there; gguf-py 0.19 says 40, a type no file stores). Ids that
# ggml removed (4, 5, 31-33, 36-38) are unknown.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)             # both little-endian with 64-bit counts (version 1 had 32-bit ones)
GGUF_ALIGNMENT = 32                # general.alignment when absent
GGUF_MAX_DIMS = 4                  # GGML_MAX_DIMS
# key/value type id -> (name, struct format of one scalar; "" for string and array)
GGUF_VALUE_TYPES: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
    5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 8: ("STRING", ""), 9: ("ARRAY", ""),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
GGUF_SHARD = r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$"     # gguf-py's SHARD_NAME_FORMAT
# Refusals of convert --to gguf (spec/gguf.md §7): ID -> statement.
GGUF_REFUSALS: dict[str, str] = {
    "GCV-01": "architectures[0] is one spec/gguf.md §4.1 maps",
    "GCV-02": "32-blocks lie inside one group: group_size % 32 == 0 and in_features % 32 == 0",
    "GCV-03": "weight_g_idx, where present, is the identity arange(in) // group_size",
    "GCV-04": "every scale (and Q4_1 minimum) is held exactly by fp16 (unless --allow-lossy)",
    "GCV-05": "no asymmetric 8-bit modules (no exact ggml block type)",
    "GCV-06": "--outtype and --int4-asym take the values the spec lists",
    "GCV-07": "codes q - z lie in the block type's range (zero points inside the int range)",
    "GCV-08": "gguf-py names every tensor for the architecture",
    "GCV-09": "config.json has every hyperparameter the architecture needs, consistent with the shapes",
    "GCV-10": "expert stacks are complete sets 0..E-1 of one type, shape and scheme",
    "GCV-11": "the tokenizer is one gguf-py's readers take, with a known pre-tokenizer",
    "GCV-12": "the input is a pack-quantized or dense checkpoint, not one in the Marlin layout",
}

# Rule catalogue: ID -> (default severity, one-line statement). spec/ctformat.md §6 is the
# prose; tests check that the two list the same IDs and that each has a fixtures/bad/ case.
RULES: dict[str, tuple[str, str]] = {
    "FILE-01": ("error", "MODEL is a folder with safetensors weights (and normally config.json), or one .safetensors file"),
    "FILE-02": ("error", "weights are safetensors; pickle files are never read"),
    "FILE-03": ("error", "the index is a JSON object whose weight_map maps tensor names to shard file names"),
    "FILE-04": ("error", "every shard name in the index is a plain relative path inside the model folder"),
    "FILE-05": ("error", "every shard the index names exists"),
    "FILE-06": ("error", "the index and the shard headers list the same tensors, each in exactly one shard"),
    "HDR-01": ("error", "the header length is at least 2, at most the cap, and fits in the file"),
    "HDR-02": ("error", "the header is a UTF-8 JSON object"),
    "HDR-03": ("error", "each header entry has a known dtype, a shape of non-negative ints and two data offsets"),
    "HDR-04": ("error", "each tensor's byte length equals dtype size times the product of its shape"),
    "HDR-05": ("error", "tensor byte ranges tile the data buffer from 0 without holes or overlaps"),
    "HDR-06": ("error", "the data buffer ends exactly at the end of the file"),
    "CFG-01": ("error", "config.json is a UTF-8 JSON object"),
    "CFG-02": ("error", "quantization_config.quant_method is compressed-tensors (gptq and awq: spec/gptq-awq.md)"),
    "CFG-03": ("error", "every group with weights has a format ctformat reads (not mxfp6, not mixed-precision or a sparsity format as a group's)"),
    "CFG-04": ("error", "config_groups is a non-empty object of schemes with targets"),
    "CFG-05": ("error", "type is int with num_bits 1..8, or float with num_bits 4 or 8"),
    "CFG-06": ("error", "strategy and group_size agree"),
    "CFG-07": ("error", "actorder is null, false, weight, static or group (true and dynamic read as group)"),
    "CFG-08": ("warning", "keys not in the schema are kept and reported"),
    "CFG-09": ("error", "targets and ignore are lists of strings; re: patterns compile"),
    "TEN-01": ("error", "a quantized module has weight_packed, weight_scale and weight_shape, plus the zero point and g_idx its scheme needs"),
    "TEN-02": ("error", "a quantized module has no tensors its scheme does not need"),
    "TEN-03": ("error", "weight_shape is I64 or I32 of shape [2], or [3] for stacked experts"),
    "TEN-04": ("error", "weight_packed is I32 with ceil(in*bits/32) words per row (or the padded count)"),
    "TEN-05": ("error", "weight_scale is a float tensor shaped for the strategy"),
    "TEN-06": ("error", "weight_zero_point is I32 packed along dim 0, or I8 [out, groups] before CT 0.9.4"),
    "TEN-07": ("error", "weight_g_idx is I32 with one entry per input column"),
    "TEN-08": ("error", "group_size divides in_features"),
    "TEN-09": ("error", "a module matched by ignore carries no quantized tensors"),
    "TEN-10": ("error", "quantized tensors belong to a module some config group targets"),
    "TEN-11": ("error", "a module a config group targets is stored quantized, not dense"),
    "TEN-12": ("warning", "fused siblings (q/k/v, gate/up, w1/w3) share one scheme"),
    "TEN-13": ("warning", "no dense MoE router is targeted only by the class Linear, which matched it in some producer eras and not others"),
    "VLLM-01": ("warning", "--target vllm: no act-order g_idx (vLLM >= 0.30 refuses actorder group)"),
    "VLLM-02": ("warning", "--target vllm: vLLM finds a scheme and a CUDA kernel for each group's Linear layers on every GPU generation"),
    "VLLM-03": ("warning", "--target vllm: expert 0's projections share one scheme and a fused-MoE backend fits"),
    "VLLM-04": ("warning", "--target vllm: the input activations are quantized as declared on every GPU generation (no weight-only fallback)"),
    "VLLM-05": ("warning", "--target vllm: the checkpoint is not pre-repacked Marlin (no vLLM >= 0.10.2 loads that)"),
    "VLLM-06": ("warning", "--target vllm: a Mixtral's ignore and targets name its experts as vLLM looks them up (w1/w3/w2)"),
    "VLLM-07": ("warning", "--target vllm: no legacy sparsity_config (vLLM 0.33 removed sparsity support)"),
    "VLLM-08": ("warning", "--target vllm: online transforms sit at the input or output of Linear layers (run at tensor-parallel size 1)"),
    "VLLM-09": ("warning", "--target vllm: kv_cache_scheme is symmetric float8, per tensor or per attention head"),
    "VLLM-10": ("warning", "--target vllm: vLLM 0.33's auto_gptq / auto_awq takes the GPTQ/AWQ scheme (symmetric 4/8-bit GPTQ without act-order groups)"),
    "VLLM-11": ("error", "--target vllm: no MoE router is stored quantized (vLLM builds every router unquantized)"),
    "TRF-01": ("warning", "--target transformers: Mixtral experts carry the names transformers' Mixtral reads (w1/w2/w3)"),
    "TRF-02": ("warning", "--target transformers: no online transforms, which transformers does not apply"),
    "TRF-03": ("warning", "--target transformers: a GPTQ/AWQ checkpoint has no quantized MoE experts (transformers 5 loads them as random values)"),
    "MRL-01": ("error", "a Marlin quantization_config has the known layout, a valid compressed_tensors config, and legacy keys only on the legacy subset"),
    "MRL-02": ("error", "a Marlin module has B and s, zp only if asymmetric, g_idx and perm together, nothing else but bias"),
    "MRL-03": ("error", "B is I32 [K/16, N*bits/2] with bits 4 or 8 and N a multiple of 64"),
    "MRL-04": ("error", "s is F16 or BF16 [G, N] with G = 1 or K/G in {32, 64, 128}, of the dtype marlin.scale_dtype names"),
    "MRL-05": ("error", "zp is I32 [G, N/8]; g_idx and perm are I32 [K]"),
    "MRL-06": ("error", "each Marlin module's bits, group size, symmetry and act-order match the stored compressed-tensors config"),
    "MRL-07": ("error", "perm is a permutation of 0..K-1 and g_idx is sorted within [0, G)"),
    "MRL-08": ("error", "a checkpoint tagged for the legacy Marlin readers holds only modules they read: F16 scales, N % 256 == 0, K % 128 == 0, no MoE experts"),
    "GPTQ-01": ("error", "the GPTQ config has quant_method gptq, bits 2/3/4/8, group_size -1 or positive, boolean sym and desc_act, format gptq or gptq_v2, a valid dynamic"),
    "GPTQ-02": ("error", "a GPTQ module has qweight, qzeros, scales (g_idx with desc_act) and nothing else but bias, and the config quantizes it"),
    "GPTQ-03": ("error", "qweight is I32 [ceil(K*b/32), N]"),
    "GPTQ-04": ("error", "scales is F16, BF16 or F32 [G, N]"),
    "GPTQ-05": ("error", "qzeros is I32 [G, ceil(N*b/32)]"),
    "GPTQ-06": ("error", "g_idx is I32 [K]"),
    "GPTQ-07": ("error", "g_idx entries lie in [0, G), and are k // group_size without desc_act"),
    "GPTQ-08": ("error", "every stored zero decodes to a code (v1: no 2^b - 1); with sym every zero is 2^(b-1)"),
    "GPTQ-09": ("error", "padding bits of qweight and qzeros are zero"),
    "GPTQ-10": ("warning", "scales are F16"),
    "GPTQ-11": ("error", "the ctformat provenance block is valid and agrees with each module's GPTQ/AWQ scheme"),
    "AWQ-01": ("error", "the AWQ config has quant_method awq, bits 4, group_size -1 or positive, boolean zero_point, version gemm"),
    "AWQ-02": ("error", "an AWQ module has qweight, qzeros, scales, nothing else but bias, and is not in modules_to_not_convert"),
    "AWQ-03": ("error", "qweight is I32 [K, N/8]"),
    "AWQ-04": ("error", "scales is F16, BF16 or F32 [K/group_size, N]"),
    "AWQ-05": ("error", "qzeros is I32 [G, N/8]"),
    "AWQ-06": ("error", "with zero_point false every stored zero is 8"),
    "DATA-01": ("error", "scales are finite and greater than zero"),
    "DATA-02": ("error", "zero points lie in the signed range of num_bits"),
    "DATA-03": ("error", "g_idx entries lie in [0, groups)"),
    "DATA-04": ("error", "padding bits of weight_packed and weight_zero_point are zero"),
    "DATA-05": ("error", "weight_shape holds the shape the other tensors imply"),
    # spec/formats.md §9: the formats besides pack-quantized, kv-cache scales, transforms
    "FMT-01": ("error", "every group with weights has a format that fits its args"),
    "FMT-02": ("error", "the args fields agree: block_structure iff block, dynamic local only with tensor_group, token only dynamic, strategies allowed for the role"),
    "FMT-03": ("warning", "mixed-precision names two or more group formats; one format is named at the top"),
    "FMT-04": ("warning", "a group's format is the one compressed-tensors infers for its args"),
    "FMT-10": ("error", "a module has every tensor its format and args require"),
    "FMT-11": ("error", "a module has no tensor beyond its format's set and bias"),
    "FMT-12": ("error", "the root tensor has the dtype of its format"),
    "FMT-13": ("error", "the root tensor is 2-D (3-D stacked) with the shape its format implies"),
    "FMT-14": ("error", "weight_scale has the dtype of its format (float, F8_E4M3 or U8 E8M0)"),
    "FMT-15": ("error", "weight_scale has the shape of its strategy"),
    "FMT-16": ("error", "weight_zero_point has zp_dtype and the scale's shape"),
    "FMT-17": ("error", "global scales are F32 [1] ([E, 1] stacked)"),
    "FMT-18": ("error", "static input/output qparams have the activation strategy's dtype and shape"),
    "FMT-19": ("error", "group_size divides in_features for group and tensor_group"),
    "FMT-20": ("warning", "--target vllm: FP8 blocks fit vLLM's block kernels (in % block width, fused output parts % block height)"),
    "FMT-21": ("error", "a legacy sparse module has compressed, bitmask, shape (and row_offsets) of the right dtypes and shapes"),
    "FMT-22": ("error", "marlin-24 cannot be dequantized: no decompressor exists"),
    "FMT-30": ("error", "weight scales are finite and > 0 (no FP8 NaN, no E8M0 255)"),
    "FMT-31": ("error", "F8_E4M3 weight values are not NaN"),
    "FMT-32": ("error", "global scales and static input scales are finite and > 0"),
    "FMT-33": ("error", "int values and zero points lie in the range of num_bits"),
    "FMT-34": ("error", "a sparse bitmask has as many set bits as values, row_offsets are its running counts"),
    "KV-01": ("error", "kv_cache_scheme is well-formed static tensor or attn_head args"),
    "KV-02": ("error", "every attention module has k_scale and v_scale iff kv_cache_scheme is set"),
    "KV-03": ("error", "k/v scales are float [1] (tensor) or [kv_heads, 1, 1] (attn_head); zero points iff asymmetric"),
    "KV-04": ("error", "k/v scales are finite and > 0"),
    "XFM-01": ("error", "transform_config schemes have a known type and apply entries with targets and a known location"),
    "XFM-02": ("error", "every online transform has its rotation tensor for each size its targets need; offline ones have none"),
    "XFM-03": ("error", "a rotation tensor is square 2-D, of the size its targets need, in the declared precision"),
    "XFM-04": ("error", "Hadamard rotations have entries +-1 and R R^T = n I; random matrices are invertible"),
    "GGUF-01": ("error", "a .gguf file starts with the magic GGUF and version 2 or 3"),
    "GGUF-02": ("error", "the header (key/values, tensor infos) parses inside the file: known value types, UTF-8 strings"),
    "GGUF-03": ("error", "keys are unique; general.architecture is a string; general.alignment, if set, a power of two"),
    "GGUF-04": ("error", "tensor names are unique; each tensor has 1..4 dims, a known ggml type, ne[0] a multiple of its block"),
    "GGUF-05": ("error", "tensor data lies aligned inside the file, each tensor at its own offset, without overlaps"),
    "GGUF-06": ("error", "a split set is complete: every shard present, split.no 0..n-1, one split.count and the total split.tensors.count"),
}
