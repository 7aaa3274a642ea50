"""Tiny, randomly initialised pipelines of every family, built from the real diffusers classes.

Each ``make_tiny_*`` builds a seeded pipeline a few hundred kB in size and saves it with
``save_pretrained`` to ``path``, so tests exercise the same loading code as real models.
The tokenizers are built in memory from small character vocabularies (no hub access).

    >>> make_tiny_sd(tmp_path / "sd")  # doctest: +SKIP
    >>> StableDiffusionPipeline.from_pretrained(tmp_path / "sd")("a cat", num_inference_steps=2)
"""

from __future__ import annotations

import hashlib
import shutil
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SEED = 0
_CHARS = string.ascii_lowercase + string.digits + ",.!?-'"


# --- tokenizers ---------------------------------------------------------------------------------


def _clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE: every character, alone and as a word end (``x</w>``)."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(_CHARS) + [c + "</w>" for c in _CHARS]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    tok.model_max_length = 77
    return tok


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols, with Qwen's chat markers and a chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.model_max_length = 512
    return tok


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram over single characters (with and without the word-start marker ``▁``)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("▁" + c, -3.0) for c in _CHARS]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(2)][::-1]
    tok = T5Tokenizer(vocab=pieces, extra_ids=2)
    tok.model_max_length = 512
    return tok


# --- text encoders ------------------------------------------------------------------------------


def _clip_config(vocab_size: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def _sd_scheduler() -> EulerDiscreteScheduler:
    # SD 1.x's noise schedule; the engine swaps in the requested scheduler from this config
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def _tiny_vae(latent_channels: int, **extra: object) -> AutoencoderKL:
    # two blocks -> a 2x downscale, so a 64x64 image is a 32x32 latent
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **extra,
    )


# --- pipelines ----------------------------------------------------------------------------------


def make_tiny_sd(path: Path | str, *, inpainting: bool = False) -> Path:
    """A StableDiffusionPipeline whose default output is 64x64 (UNet sample_size 32, VAE 2x).
    ``inpainting``: a dedicated inpainting checkpoint instead (a 9-channel UNet: latents, mask
    and masked-image latents, saved as a StableDiffusionInpaintPipeline)."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=32,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae(4)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, path)


def make_tiny_sdxl(path: Path | str) -> Path:
    """A StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning), 64x64 default."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        # pooled text embeds (32) + 6 size/crop numbers x 8
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,  # both encoders' hidden states side by side (32 + 32)
        norm_num_groups=4,
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae(4)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer), projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        scheduler=_sd_scheduler(),
    )
    return _save(pipe, path)


def make_tiny_zimage(path: Path | str) -> Path:
    """A ZImagePipeline: Qwen3 text encoder, S3-DiT transformer, 16-channel VAE, flow shift 3."""
    torch.manual_seed(SEED)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],  # sums to the head size 32 / 2
        axes_lens=[256, 32, 32],
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer = _qwen_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
    )
    return _save(pipe, path)


def make_tiny_flux(path: Path | str) -> Path:
    """A FluxPipeline (schnell-style: no guidance embedding): CLIP + T5 encoders, MMDiT."""
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=False,
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(SEED)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    pipe = FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )
    return _save(pipe, path)


MAKERS = {
    "sd": make_tiny_sd,
    "sdxl": make_tiny_sdxl,
    "z-image": make_tiny_zimage,
    "flux": make_tiny_flux,
}


def save_zimage_single_file(folder: Path | str, path: Path | str) -> Path:
    """Write the transformer of a saved ZImagePipeline as an original-format single file.

    The inverse of diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``: keys
    under ``model.diffusion_model.``, the original names, and q/k/v fused into ``qkv``.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")
    renames = {
        "all_final_layer.2-1.": "final_layer.",
        "all_x_embedder.2-1.": "x_embedder.",
        ".attention.to_out.0.": ".attention.out.",
        ".attention.norm_k.": ".attention.k_norm.",
        ".attention.norm_q.": ".attention.q_norm.",
    }
    original = {}
    for key, tensor in weights.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # fused into qkv with to_q below
        if ".attention.to_q." in key:
            parts = [weights[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            key, tensor = key.replace("to_q", "qkv"), torch.cat(parts)
        for new, old in renames.items():
            key = key.replace(new, old)
        original["model.diffusion_model." + key] = tensor
    save_file(original, path)
    return Path(path)


def populate_hub_cache(cache_dir: Path | str, repo_id: str, folder: Path | str) -> Path:
    """Place a saved pipeline folder into a Hugging Face hub cache as if ``repo_id`` was pulled.

    Writes the cache layout ``models--org--name/{refs/main, snapshots/<commit>/...}`` (plain
    files instead of blob symlinks, which the hub client also accepts) and returns the snapshot.
    """
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def make_tiny_taesd(path: Path | str, *, latent_channels: int = 4) -> Path:
    """A tiny AutoencoderTiny (the TAESD family's class) in diffusers format: two decoder blocks,
    so it decodes a latent to twice its size, as the tiny VAEs above do."""
    torch.manual_seed(SEED)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=latent_channels,
    )
    return _save(taesd, path)


def _save(pipe: object, path: Path | str) -> Path:
    path = Path(path)
    pipe.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def make_tiny_ip_adapter(folder: Path | str, pipeline: Path | str) -> Path:
    """An IP-Adapter for the UNet of the pipeline folder ``pipeline``, in h94/IP-Adapter's
    layout: ``folder/ip-adapter.safetensors`` (the image projection and a key/value projection
    per cross-attention layer, numbered 1, 3, 5, ... as the original checkpoints are) and a tiny
    CLIP image encoder in ``folder/image_encoder``. Returns the weights file."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline) / "unet")
    embed_dim, tokens = 16, 4
    torch.manual_seed(SEED)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=embed_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    encoder.save_pretrained(folder / "image_encoder")
    cross = unet.config.cross_attention_dim
    weights = {
        "image_proj.proj.weight": torch.randn(tokens * cross, embed_dim) * 0.1,
        "image_proj.proj.bias": torch.zeros(tokens * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):  # cross-attention, in attn_processors order
            shape = module.to_k.weight.shape
            weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(shape) * 0.1
            weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(shape) * 0.1
            key_id += 2
    path = folder / "ip-adapter.safetensors"
    save_file(weights, path)
    return path


# family -> (the pipeline class, its denoiser's folder, save_lora_weights' argument for it)
_LORA_TARGETS = {
    "sd": (StableDiffusionPipeline, "unet", "unet_lora_layers"),
    "sdxl": (StableDiffusionXLPipeline, "unet", "unet_lora_layers"),
    "z-image": (ZImagePipeline, "transformer", "transformer_lora_layers"),
    "flux": (FluxPipeline, "transformer", "transformer_lora_layers"),
}


def make_tiny_lora(
    pipeline_folder: Path | str, out_file: Path | str, family: str, seed: int = SEED
) -> Path:
    """A rank-4 LoRA on the attention projections (to_q, to_k, to_v, to_out.0) of the denoiser
    of the saved pipeline ``pipeline_folder``, written to ``out_file`` with the pipeline class's
    ``save_lora_weights`` (diffusers' format, what ``load_lora_weights`` reads). Its up
    projections are random (``init_lora_weights=False``), so it changes the output; another
    ``seed`` gives another LoRA."""
    from peft import LoraConfig, get_peft_model_state_dict

    cls, component, argument = _LORA_TARGETS[family]
    folder = Path(pipeline_folder) / component
    model_class = UNet2DConditionModel if component == "unet" else _transformer_class(folder)
    model = model_class.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,
    )
    model.add_adapter(config)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(  # type: ignore[attr-defined]
        out_file.parent, weight_name=out_file.name, **{argument: get_peft_model_state_dict(model)}
    )
    return out_file


def _transformer_class(folder: Path) -> type:
    import json

    import diffusers

    cls: type = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    return cls
