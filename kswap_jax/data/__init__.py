"""Data: sources (tfds over array_record, bundled digits, synthetic), splits, streams.

    sources.load_source(cfg, split)       -> random-access source (image uint8 HWC, label)
    splits.knowledge_swap_splits(...)     -> retain/forget/learn x train/test `Subset`s
    streams.make_stream(subsets, ...)     -> padded, masked, per-process batches by index
    streams.eval_batches(subset, ...)     -> one ordered pass for evaluation
    python -m kswap_jax.data.image_folder -> image folders to a tfds array_record dataset
"""
