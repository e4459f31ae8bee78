"""Tiny real models saved with save_pretrained, loaded through the same code as a real checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, cast


def corpus_texts(n: int | None = None) -> list[str]:
    raw = resources.files("aigc_models").joinpath("data/news_corpus.jsonl").read_text(encoding="utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()][:n]
    return [f"Headline: {d['headline']}\n\n{d['body']}" for d in docs]


def build_tiny_text_model(out: Path, *, n_layer: int = 2, n_embd: int = 32, train_seconds: float = 0.0) -> Path:
    """A byte-level BPE tokenizer and a 2-layer GPT-2, optionally trained for a few seconds."""
    from aigc_models.tiny_text import save, tiny_gpt2, train_tokenizer
    from tests.support.train_text import TrainConfig, train_causal_lm

    texts = corpus_texts()
    tok = train_tokenizer(texts, vocab_size=512)
    model = tiny_gpt2(tok, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=256)
    if train_seconds:
        train_causal_lm(model, tok, texts, TrainConfig(max_seconds=train_seconds, early_stopping=False,
                                                       eval_every=10_000, block_size=64))
    return save(model, tok, out)


def build_tiny_ddim(out: Path) -> Path:
    """An unconditional DDIM pipeline on a 16x16 UNet2DModel (noise until trained)."""
    # From their modules: mypy reads diffusers' top-level names as its dummy objects.
    import torch
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100, steps_offset=1,
                                                   clip_sample=False)).save_pretrained(out)
    return out


def build_tiny_sd(out: Path) -> Path:
    """A Stable-Diffusion-style pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder with a
    character-level tokenizer, DDIM) making 16x16 images; noise until trained."""
    import tempfile

    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False),
        # diffusers documents None for both (no safety checker); its annotations do not say so
        safety_checker=cast(Any, None), feature_extractor=cast(Any, None), requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_tiny_vits(out: Path) -> Path:
    """A VitsModel from VitsConfig with a character vocabulary (noise until trained)."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["_", *" abcdefghijklmnopqrstuvwxyz'.,?!-"])}  # "_": pad and blank
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(out / "vocab.json"), pad_token="_", unk_token=None, add_blank=True,
                              normalize=True, phonemize=False)
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        flow_size=16, spectrogram_bins=33, upsample_initial_channel=32, upsample_rates=[8, 8, 4],
        upsample_kernel_sizes=[16, 16, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=2, prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=2, duration_predictor_filter_channels=16, depth_separable_num_layers=2,
        sampling_rate=16000)
    torch.manual_seed(0)
    VitsModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
