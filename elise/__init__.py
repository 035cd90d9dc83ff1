"""elise: CSM/Marvis-style text-to-speech (Llama backbone + depth decoder over Mimi codes)."""

__version__ = "0.1.0"
