"""Hugging Face Llama weights in and out: ``config.json`` ⇄ [model] (config.py), tensor names and
layouts (mapping.py), safetensors and tokenizer files (files.py), checkpoint conversion (convert.py)."""
