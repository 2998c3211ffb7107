"""Hugging Face weights in and out (Llama, Mistral, Qwen2/2.5, Qwen3): ``config.json`` ⇄ [model]
(config.py), tensor names and layouts (mapping.py), safetensors and tokenizer files (files.py),
checkpoint conversion (convert.py)."""
