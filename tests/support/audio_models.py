"""Tiny MusicGen and SpeechT5 checkpoints built from configs (noise until trained), saved with
save_pretrained the way the real ones are laid out, so the real loading code runs on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXTS = [
    "Warm lo-fi piano with soft drums and a slow bass line.",
    "An upbeat eighties synth-pop track with bright pads and a driving beat.",
    "Hello world, this is a test of the speech engine.",
    "The council met on Tuesday to discuss the new bridge over the river.",
    "Rain is expected tomorrow morning; the weekend looks sunny and mild.",
    "Quiet jazz for a late night, brushed snare, upright bass, muted trumpet.",
] * 4


def build_tiny_musicgen(out: Path) -> Path:
    """MusicgenForConditionalGeneration from a 1-layer T5 encoder, a 1-layer decoder over 2 codebooks of
    64 codes and a small EnCodec at 16 kHz / 50 frames a second; a byte-level BPE tokenizer."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        PreTrainedTokenizerFast,
        T5Config,
    )

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="</s>",
                                        unk_token="</s>")
    text = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    audio = EncodecConfig(sampling_rate=16000, audio_channels=1, num_filters=4, hidden_size=16, codebook_size=64,
                          upsampling_ratios=[8, 8, 5], num_residual_layers=1, num_lstm_layers=1, kernel_size=3,
                          last_kernel_size=3, residual_kernel_size=3, target_bandwidths=[0.6])
    decoder = MusicgenDecoderConfig(vocab_size=64, num_codebooks=2, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=1024, pad_token_id=64,
                                    bos_token_id=64, decoder_start_token_id=64)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config)
    with torch.no_grad():  # EnCodec's codebooks start at zero (k-means fills them in training): all codes alike
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    # What the released checkpoints' generation_config.json says, less the 30 s max_length.
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = 64
    gen.do_sample, gen.guidance_scale, gen.top_k = True, 3.0, 250
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_speecht5(out: Path, speakers: int = 3) -> Path:
    """SpeechT5ForTextToSpeech (8 mel bins) with its SpeechT5Tokenizer on a sentencepiece character model
    trained here, a SpeechT5HifiGan in vocoder/ (hop 256 at 16 kHz) and ``speakers`` x-vectors of 512
    floats in speaker_embeddings.npy."""
    import sentencepiece as spm
    import torch
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(out / "spm_char"),
                                   model_type="char", vocab_size=48, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                                   character_coverage=1.0, minloglevel=2)
    tokenizer = SpeechT5Tokenizer(str(out / "spm_char.model"))
    config = SpeechT5Config(
        vocab_size=len(tokenizer), hidden_size=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=8,
        speech_decoder_prenet_units=16, speech_decoder_postnet_layers=2, speech_decoder_postnet_units=16,
        speech_decoder_postnet_kernel=3, speaker_embedding_dim=512, reduction_factor=2, max_text_positions=256,
        max_speech_positions=2048, sampling_rate=16000)
    torch.manual_seed(0)
    model = SpeechT5ForTextToSpeech(config)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4, 4, 4],
        upsample_kernel_sizes=[8, 8, 8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]]))
    with torch.no_grad():
        # Untrained, the stop head fires at once (one frame of audio) and the prenet's biases are zero:
        # speak until maxlenratio, and let the prenet's dropout (the seed) show in the output.
        model.speech_decoder_postnet.prob_out.bias.fill_(-8.0)
        for layer in model.speecht5.decoder.prenet.layers:
            layer.bias.normal_(0.0, 0.5)
        for p in vocoder.parameters():  # HiFi-GAN's init makes an inaudible 1e-10; make it audible
            p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    vocoder.save_pretrained(out / "vocoder")
    SpeechT5Processor(tokenizer=tokenizer, feature_extractor=SpeechT5FeatureExtractor(
        num_mel_bins=8, sampling_rate=16000)).save_pretrained(out)
    rng = np.random.default_rng(0)
    np.save(out / "speaker_embeddings.npy", rng.normal(size=(speakers, 512)).astype(np.float32))
    return out
