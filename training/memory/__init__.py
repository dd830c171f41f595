"""Memory banks: the protocol and entry codec (``base``) and its two implementations."""

from training.memory.base import STORAGES, MemoryBank, Storage, check_storage, decode_entry, encode_entry
from training.memory.in_memory import InMemoryMemoryBank
from training.memory.redis_bank import RedisMemoryBank

__all__ = ["STORAGES", "InMemoryMemoryBank", "MemoryBank", "RedisMemoryBank", "Storage", "check_storage",
           "decode_entry", "encode_entry"]
