"""`import llava_rt.runtime` and a whole generation never import torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_runs_without_torch_or_transformers(variants):
    script = textwrap.dedent(
        f"""
        import sys
        import llava_rt.runtime
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "imported at import time"
        from llava_rt.runtime import Pipeline
        import numpy as np
        image = np.zeros((20, 30, 3), dtype=np.uint8)
        result = Pipeline.load({str(variants["mistral"].bundle)!r}).generate(prompt="hi", images=[image], max_new_tokens=2)
        assert result.token_ids
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not leaked, leaked
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
