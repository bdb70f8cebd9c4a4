"""`llava-bench`: transformers against llava-rt bundles, stage by stage (presets, sides, machine limits, report)."""
