"""Import hygiene: the training library imports no TensorFlow."""

import subprocess
import sys


def test_engine_imports_no_tensorflow():
    code = ("import sys, flexvision.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
