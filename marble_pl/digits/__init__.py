"""A small real text-to-image task: handwritten digits drawn by a CPU-pretrained SD3 pipeline."""
