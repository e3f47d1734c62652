"""The stitched model itself: stitch layers (the paper's equations), BTSForCausalLM, how members run (runners,
batched), loading and checking members, the one adapter to transformers internals (hf), surgery (add / remove
experts) and capacity planning. Imports nothing above it: no training, no pipeline."""
