"""The decoder, its checkpoints, tokenizer and generation."""
from models.checkpoint import Loaded, load_checkpoint, load_config, load_pretrained, save_pretrained
from models.config import ModelConfig
from models.decoder import Decoder, KVCache
from models.hub import CheckpointError
from models.tokenizer import load_tokenizer
from models.weight_format import WeightFormat

__all__ = ["CheckpointError", "Decoder", "KVCache", "Loaded", "ModelConfig", "WeightFormat", "load_checkpoint",
           "load_config", "load_pretrained", "load_tokenizer", "save_pretrained"]
