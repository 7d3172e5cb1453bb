"""The benchmarks refuse a GPU device torch cannot see with a usage error naming --device."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
@pytest.mark.parametrize("script", ["compare_fairchem", "gpu_checks", "bf16_error"])
def test_cuda_without_gpu_is_a_usage_error(script, capsys):
    main = __import__(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda"])
    assert stop.value.code == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err
