"""Submitting speech fine-tuning: a SpeechT5 base (VITS cannot be trained by transformers), its options,
and the (audio, text) dataset validated line by line and, when local, put into the object store."""

from __future__ import annotations

from typing import Any

from aigc_core.errors import SpecError
from aigc_core.registry import ModelRef, model_facts
from scheduler.image_training import stage_media_dataset


def speech_finetune_params(client, base: ModelRef, dataset: str, output_model: str,
                           hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The job's params and seed for fine-tuning the hf-tts checkpoint ``base`` on ``dataset``."""
    from aigc_models.speech_data import SpeechFinetuneConfig, validate_speech_dataset

    model_type = model_facts(base).model_type
    if model_type == "vits":
        raise SpecError(f"base model {base.tag} is a VITS voice: transformers cannot train VITS (VitsModel has no "
                        "training loss; it raises NotImplementedError given labels); fine-tune a SpeechT5 "
                        "checkpoint instead")
    if model_type != "speecht5":
        raise SpecError(f"base model {base.tag} ({model_type or 'unknown model_type'}): speech fine-tuning takes "
                        "SpeechT5 text-to-speech checkpoints")
    try:
        cfg = SpeechFinetuneConfig.from_dict(hyperparameters or {})
    except (TypeError, ValueError) as e:
        raise SpecError(f"hyperparameters: {e}") from None
    uri, sha, stats = stage_media_dataset(client, dataset, validate_speech_dataset)
    params = {"trainer": "speecht5", "dataset": uri, "dataset_sha256": sha, "output_model": output_model,
              "hyperparameters": cfg.to_dict(), "dataset_stats": stats}
    return params, cfg.seed
