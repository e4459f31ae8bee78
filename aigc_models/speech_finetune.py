"""Fine-tuning SpeechT5 text to speech on (audio, text) pairs, as Hugging Face's SpeechT5 guide does:
the processor turns each clip into a log-mel target, SpeechT5ForTextToSpeech's forward with ``labels``
gives its loss (L1 on the spectrogram before and after the postnet, plus the stop token's BCE) for
one speaker x-vector of the checkpoint. The text encoder stays frozen unless ``train_encoder``.

Why not VITS: transformers' ``VitsModel.forward`` raises ``NotImplementedError("Training of VITS is
not supported yet.")`` when given labels. VITS trains as a GAN (a discriminator, a KL term, a duration
loss), and none of that is in the library; a VITS checkpoint is refused at submit with that reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aigc_models.finetune import DatasetError
from aigc_models.image_data import ImageRecord
from aigc_models.speech_data import SpeechFinetuneConfig
from aigc_models.train_loop import Run, check_resumable, read_state, records_sha256, train_loop, training_state

RESUME_KEYS = ("seed", "batch_size", "speaker_id", "train_encoder")
EVAL_CLIPS = 4


def finetune_speecht5(
    base_dir: Path | str, data_dir: Path | str, records: Sequence[ImageRecord], out_dir: Path,
    cfg: SpeechFinetuneConfig, *, resume_from: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None, checkpoint_dir: Path | None = None,
    validation_dir: Path | None = None, device: str = "auto",
) -> dict[str, Any]:
    """Train on ``records`` (clips under ``data_dir``); write the checkpoint, vocoder and speakers to
    ``out_dir``. Stopping, checkpoints and resume as ``finetune_diffusion``."""
    import torch

    from aigc_models.device import resolve_device

    if not records:
        raise DatasetError("no clips to fine-tune on")
    device = resolve_device(device)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    state = read_state(Path(resume_from)) if resume_from else None
    fingerprint = records_sha256(records)
    if state:
        check_resumable(state, cfg, fingerprint, RESUME_KEYS)
    gpus = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=gpus):
        m = _Speech(base_dir, cfg, device)
        params = [p for p in m.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        run = Run(cfg, fingerprint, len(records))
        data = _Clips(Path(data_dir), list(records), m, cfg)
        evaluation = data.eval_set()
        if state:
            assert resume_from is not None
            run.restore(state, m.model, opt, Path(resume_from))
        else:
            run.eval_before = m.eval_loss(evaluation)
        reason = train_loop(run, m, data, opt, params, evaluation, Path(checkpoint_dir or out_dir / "checkpoints"),
                            on_event, on_checkpoint, should_stop)
    metrics = run.metrics(reason)
    if reason != "interrupted":
        m.save(base_dir, out_dir, {"config": cfg.to_dict(), "metrics": metrics})
        if validation_dir is not None:
            metrics["validation_audio"] = validation_audio(base_dir, out_dir, cfg, validation_dir, device)
    return metrics


class _Speech:
    def __init__(self, base_dir: Path, cfg: SpeechFinetuneConfig, device: str):
        import torch
        import transformers
        from transformers import SpeechT5ForTextToSpeech, SpeechT5Processor

        from aigc_models.speecht5 import read_speakers

        transformers.logging.set_verbosity_error()
        self.cfg, self.device = cfg, device
        self.processor = SpeechT5Processor.from_pretrained(base_dir, local_files_only=True)
        self.model = SpeechT5ForTextToSpeech.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True,
                                                             local_files_only=True)
        speakers = read_speakers(base_dir, int(self.model.config.speaker_embedding_dim))
        if cfg.speaker_id >= len(speakers):
            raise ValueError(f"speaker_id {cfg.speaker_id}: the checkpoint has {len(speakers)} speaker x-vectors")
        self.speaker = torch.from_numpy(speakers[cfg.speaker_id]).to(device)
        self.model.speecht5.encoder.requires_grad_(cfg.train_encoder)
        self.model.to(device).train()  # type: ignore[arg-type]

    def loss(self, input_ids, attention_mask, labels, step_seed: int):
        import torch

        torch.manual_seed(step_seed)  # the decoder prenet's dropout, drawn even in eval, as Tacotron 2's
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         labels=labels.to(self.device),
                         speaker_embeddings=self.speaker.expand(len(input_ids), -1))
        return out.loss

    def eval_loss(self, evaluation) -> float:
        import torch

        self.model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            value = self.loss(*evaluation).item()
        self.model.train()
        return value

    def trainable(self) -> dict:
        return training_state(self.model)

    def save(self, base_dir: Path, out_dir: Path, card: dict[str, Any]) -> None:
        """The base directory (vocoder, processor, speaker x-vectors) with the new weights in place."""
        def weights(folder: str, names: list[str]) -> list[str]:
            top = Path(folder) == base_dir
            return [n for n in names if top and ((n.startswith("model") and ".safetensors" in n)
                                                  or n in ("pytorch_model.bin", "config.json", "finetune.json"))]

        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(base_dir, out_dir, ignore=weights)
        self.model.eval().to("cpu").save_pretrained(out_dir)
        (out_dir / "finetune.json").write_text(json.dumps(card, indent=1))


class _Clips:
    """Batches made as needed: each clip read, made mono at the processor's rate, turned into mel frames."""

    def __init__(self, root: Path, records: list[ImageRecord], m: _Speech, cfg: SpeechFinetuneConfig):
        self.root, self.records, self.m, self.cfg = root, records, m, cfg
        self.per_epoch = max(1, len(records) // cfg.batch_size)
        self.rate = int(m.processor.feature_extractor.sampling_rate)

    def _features(self, rec: ImageRecord):
        import numpy as np
        import soundfile as sf

        wave, rate = sf.read(str(self.root / rec.file_name), dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
        if rate != self.rate:
            wave = resample(wave, rate, self.rate)
        f = self.m.processor(text=rec.text, audio_target=wave, sampling_rate=self.rate)
        ids, mel = f["input_ids"], np.asarray(f["labels"][0], dtype=np.float32)
        config = self.m.model.config
        if len(ids) > config.max_text_positions:
            raise DatasetError(f"{rec.file_name}: its text is {len(ids)} tokens; the model reads at most "
                               f"{config.max_text_positions}")
        if len(mel) > config.max_speech_positions * config.reduction_factor:
            raise DatasetError(f"{rec.file_name}: {len(mel)} mel frames; the model makes at most "
                               f"{config.max_speech_positions * config.reduction_factor}")
        return ids, mel

    def _collate(self, recs: list[ImageRecord]):
        import torch

        feats = [self._features(r) for r in recs]
        pad = self.m.processor.tokenizer.pad_token_id
        width = max(len(ids) for ids, _ in feats)
        ids = torch.full((len(feats), width), pad, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        rf = self.m.model.config.reduction_factor
        frames = max(len(mel) - len(mel) % rf for _, mel in feats)  # as the guide's collator: whole steps
        labels = torch.full((len(feats), frames, feats[0][1].shape[1]), -100.0)
        for i, (t, mel) in enumerate(feats):
            ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
            n = min(frames, len(mel) - len(mel) % rf)
            labels[i, :n] = torch.from_numpy(mel[:n])
        return ids, mask, labels

    def batch(self, step: int):
        import torch

        cfg = self.cfg
        epoch, k = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed((cfg.seed << 20) + epoch))
        idx = [int(order[(k * cfg.batch_size + i) % len(order)]) for i in range(cfg.batch_size)]
        return (*self._collate([self.records[i] for i in idx]), (cfg.seed << 24) + step + 1)

    def eval_set(self):
        return (*self._collate(self.records[:EVAL_CLIPS]), self.cfg.seed + 7919)


def resample(wave, rate: int, to: int):
    """Linear interpolation to ``to`` Hz, after a box low-pass when going down (no scipy needed): fine
    for mel targets of speech; resample clips offline for the best quality."""
    import numpy as np

    if to < rate and (width := int(np.ceil(rate / to))) > 1:
        wave = np.convolve(wave, np.ones(width, dtype=np.float32) / width, mode="same")
    n = max(1, round(len(wave) * to / rate))
    return np.interp(np.arange(n) * (rate / to), np.arange(len(wave)), wave).astype(np.float32)


def validation_audio(base_dir: Path, out_dir: Path, cfg: SpeechFinetuneConfig, dest: Path, device: str) -> list[str]:
    """The validation texts spoken by the base and by the result, same seeds, through the SpeechT5
    backend that generation jobs use; returns the WAV file names written."""
    from aigc_models.speecht5 import SpeechT5Generator

    if not cfg.validation_texts:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for tag, src in (("before", base_dir), ("after", out_dir)):
        gen = SpeechT5Generator.load(src, device=device, dtype="float32")
        for i, text in enumerate(cfg.validation_texts):
            ids = gen.tokenizer(text, return_tensors="pt")["input_ids"]
            (wave,) = gen._forward([ids], {"speaker_id": cfg.speaker_id}, [cfg.seed + i])
            out = gen.postprocess([_Req(cfg.seed + i)], [wave], {"speaker_id": cfg.speaker_id}, 0.0)[0]
            name = f"{tag}-{i:02d}.wav"
            (dest / name).write_bytes(out.data)
            names.append(name)
    return names


class _Req:
    """The one field ``SpeechT5Generator.postprocess`` reads of a request."""

    def __init__(self, seed: int):
        self.seed = seed
