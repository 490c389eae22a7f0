"""Evaluation: zero-shot classification (:mod:`.zero_shot`) and retrieval (:mod:`.retrieval`) of two-tower
models, the zero-shot prompts (:mod:`.prompts`), held-out loss and exact match of vision-language models
(:mod:`.vlm`), and what they share (:mod:`.common`)."""
