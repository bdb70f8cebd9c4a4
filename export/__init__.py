"""Checkpoint -> bundle: the only part of llava-rt that imports torch and transformers (`llava-export`)."""
