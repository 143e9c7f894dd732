"""Optional dependencies: every extra that ctformat.extras names exists in pyproject, and a
feature whose package is missing says which extra installs it, in one line."""
from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT
from ctformat.extras import EXTRAS


def test_every_named_extra_is_declared_and_installs_its_module():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, _) in EXTRAS.items():
        assert any(req.startswith(module) for req in declared[extra]), (module, extra)


def test_explicit_triton_kernel_without_triton_names_the_gpu_extra():
    code = ("import sys; sys.modules['triton'] = None\n"            # as if it were not installed
            "import torch\nfrom ctformat import MissingDependencyError\nfrom ctformat.quant import compress, decompress\n"
            "from ctformat.scheme import QuantScheme\n"
            "s = QuantScheme.from_json({'num_bits': 4, 'strategy': 'group', 'group_size': 32}, where='x')\n"
            "t = compress(torch.randn(8, 64, dtype=torch.bfloat16), s)\n"
            "try:\n    decompress(t, s, kernel='triton')\nexcept MissingDependencyError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("triton is not installed; the GPU kernels (and their CPU interpreter) need it: "
                                "pip install 'ctformat[gpu]'")
