"""A batch input file's request lines: the parsing lives in scheduler/openai_batch.py, shared with the
client's ``submit_openai_batch`` (so ``aigc submit --openai-batch`` never imports FastAPI)."""

from scheduler.openai_batch import (
    CHAT,
    COMPLETIONS,
    ENDPOINTS,
    IMAGES,
    SPEECH,
    Parsed,
    chat_supported,
    parse_requests,
)

__all__ = ["CHAT", "COMPLETIONS", "ENDPOINTS", "IMAGES", "SPEECH", "Parsed", "chat_supported", "parse_requests"]
