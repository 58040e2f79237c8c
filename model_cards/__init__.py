"""The model card template (template.md), shipped in the package as hf_compress.model_cards."""
