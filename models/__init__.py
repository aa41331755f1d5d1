"""The decoder, its checkpoints, tokenizer and generation."""
from models.checkpoint import load_pretrained, save_pretrained
from models.config import ModelConfig
from models.decoder import Decoder, KVCache
from models.hub import CheckpointError


def load_tokenizer(path_or_hub_id):
    """The checkpoint's tokenizer (see models.tokenizer.Tokenizer)."""
    from models.tokenizer import load_tokenizer as _load

    return _load(path_or_hub_id)


__all__ = ["CheckpointError", "Decoder", "KVCache", "ModelConfig", "load_pretrained", "load_tokenizer", "save_pretrained"]
