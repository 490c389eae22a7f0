"""What the tests share besides fixtures (those are in ``tests/conftest.py``): references built from
transformers (:mod:`.hf_reference`, :mod:`.vlm_reference`), multi-process runs (:mod:`.distributed` and the
``*_workers`` modules whose functions the spawned ranks run), shards and images (:mod:`.shards`,
:mod:`.photos`) and the VLM training data (:mod:`.vlm_data`)."""
