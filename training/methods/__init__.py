"""Evaluated methods: the protocol they implement (``protocol``), the registry (``registry``), the
baselines (``prompting``, ``online_ft``); ``builtin`` registers every built-in method."""

from training.methods.protocol import Method, MethodConfig, MethodContext
from training.methods.registry import METHODS, build_method, method_info, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "MethodContext", "build_method", "method_info", "register_method"]
