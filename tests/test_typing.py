"""The type hints: every public function is annotated, the hints agree with what the code
checks at run time, and mypy finds the package consistent (pyproject's [tool.mypy])."""
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import flashattn_cupy
from flashattn_cupy import _typing, _validate
from flashattn_cupy.integrations import transformers as fa_transformers

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = [getattr(flashattn_cupy, name) for name in flashattn_cupy.__all__ if inspect.isfunction(getattr(flashattn_cupy, name))]
PUBLIC += [fa_transformers.register, fa_transformers.attention_forward]


def test_every_public_function_is_exported():
    names = {f.__name__ for f in PUBLIC}
    assert {"flash_attention", "flash_attn_func", "plan", "plan_for", "register", "attention_forward"} <= names


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f.__name__)
def test_public_functions_are_fully_annotated(function):
    signature = inspect.signature(function)
    missing = [name for name, p in signature.parameters.items() if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{function.__name__}: parameters without a type: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{function.__name__} has no return type"
    if function is not fa_transformers.register:   # the others take arrays or their sizes
        assert re.search(r"\((\.\.\.|batch), ", function.__doc__), f"{function.__name__}'s docstring gives no shapes"


def test_literal_types_list_what_the_validator_accepts():
    assert typing.get_args(_typing.Backend) == _validate.BACKENDS
    assert typing.get_args(_typing.Fp32Kernel) == _validate.FP32_KERNELS


def test_mypy_finds_the_package_consistent(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
