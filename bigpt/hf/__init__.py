"""Hugging Face weights in and out: ``config.json`` ⇄ [model] (config.py), tensor names and layouts
(mapping.py), safetensors and tokenizer files (files.py), checkpoint conversion (convert.py); the
families beyond the dense decoders in files of their own (moe.py: the MoE decoders' experts,
bert.py: BERT and RoBERTa, t5.py: T5 and mT5)."""
